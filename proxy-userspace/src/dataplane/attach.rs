use aya::programs::{SchedClassifier, TcAttachType, tc};

use super::Loaded;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("the eBPF object has no program {0}")]
    NoProgram(&'static str),
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("attaching {program} to interface {interface}: {source}")]
    Attach {
        program: &'static str,
        interface: String,
        source: aya::programs::ProgramError,
    },
    #[error("listing interfaces: {0}")]
    ListInterfaces(nix::Error),
}

const TC_INGRESS: &str = "tc_ingress";

/// Interfaces of the current network namespace the tc programs go on: all but loopback. Listed
/// through netlink (`if_nameindex`), not sysfs, because a process moved into a namespace with
/// `nsenter --net` still sees the sysfs of the namespace it came from.
pub fn tc_interfaces() -> Result<Vec<String>, AttachError> {
    let mut names: Vec<String> = nix::net::if_::if_nameindex()
        .map_err(AttachError::ListInterfaces)?
        .iter()
        .map(|i| i.name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    Ok(names)
}

/// The interfaces the tc ingress program is attached to. aya attaches with TCX links on kernels
/// ≥ 6.6 and through a clsact qdisc below that.
#[derive(Default)]
pub struct Attachments {
    pub interfaces: Vec<String>,
}

impl Attachments {
    pub fn attach_all(loaded: &mut Loaded, interfaces: &[String]) -> Result<Self, AttachError> {
        let program: &mut SchedClassifier = loaded
            .ebpf
            .program_mut(TC_INGRESS)
            .ok_or(AttachError::NoProgram(TC_INGRESS))?
            .try_into()
            .map_err(|source| AttachError::Program {
                program: TC_INGRESS,
                source,
            })?;
        program.load().map_err(|source| AttachError::Program {
            program: TC_INGRESS,
            source,
        })?;
        // aya picks TCX on kernels >= 6.6 and netlink below; only the latter needs the qdisc.
        let needs_clsact = aya::util::KernelVersion::current()
            .is_ok_and(|v| v < aya::util::KernelVersion::new(6, 6, 0));
        let mut attached = Self::default();
        for interface in interfaces {
            if needs_clsact {
                // An existing clsact qdisc is fine: ours or another tool's.
                let _ = tc::qdisc_add_clsact(interface);
            }
            program
                .attach(interface, TcAttachType::Ingress)
                .map_err(|source| AttachError::Attach {
                    program: TC_INGRESS,
                    interface: interface.clone(),
                    source,
                })?;
            attached.interfaces.push(interface.clone());
        }
        Ok(attached)
    }
}
