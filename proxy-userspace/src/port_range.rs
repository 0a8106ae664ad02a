//! Port ranges as kube-apiserver's `--service-node-port-range` spells them: the NodePort range
//! (config, the manifests source's allocator, the reserved local ports) and `run --snat-ports`.

use std::fmt;
use std::str::FromStr;

/// An inclusive port range in kube-apiserver's `--service-node-port-range` syntax
/// (`30000-32767`, or `30000+2767` for base+size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum PortRangeError {
    #[error("port range {0:?} is not FIRST-LAST or BASE+SIZE")]
    Syntax(String),
    #[error("port range {0:?} is empty or exceeds 65535")]
    Bounds(String),
}

impl FromStr for PortRange {
    type Err = PortRangeError;

    fn from_str(text: &str) -> Result<PortRange, PortRangeError> {
        let syntax = || PortRangeError::Syntax(text.to_owned());
        let bounds = || PortRangeError::Bounds(text.to_owned());
        let (first, last) = if let Some((first, last)) = text.split_once('-') {
            let first: u16 = first.trim().parse().map_err(|_| syntax())?;
            let last: u16 = last.trim().parse().map_err(|_| syntax())?;
            (first, last)
        } else if let Some((base, size)) = text.split_once('+') {
            let base: u16 = base.trim().parse().map_err(|_| syntax())?;
            let size: u16 = size.trim().parse().map_err(|_| syntax())?;
            (base, base.checked_add(size).ok_or_else(bounds)?)
        } else {
            return Err(syntax());
        };
        if first == 0 || first > last {
            return Err(bounds());
        }
        Ok(PortRange { first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}
