//! Map layout versions and the migration between them. The pins carry the version they were
//! written with in the `LAYOUT` map (layout 1, the first release, had no such map). A proxy that
//! finds pins of an older layout moves them aside into `PIN_PATH/old-vN/`, creates fresh maps of
//! the current layout, copies and converts what flows need (conntrack, affinity, socket reverse
//! NAT, and the service and backend entries whose ids those name), and, once its programs have
//! replaced the old ones, copies the conntrack entries the old programs created meanwhile and
//! removes the old pins. Everything else is programmed again from the source.

use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, Map, MapData, MapError};
use proxy_common::{
    AFFINITY_MAP, AffinityKey, AffinityValue, BACKENDS_MAP, Backend, CONFIG_MAP, CONNTRACK_MAP,
    COUNTERS_MAP, CT_F_SEEN_REPLY, CT_STATE_ESTABLISHED, CT_STATE_FIN_WAIT, CT_STATE_SYN_SENT,
    CtKey, CtValue, LAYOUT_MAP, LOCAL_CIDRS_MAP, LOCAL_IFINDEXES_MAP, MAP_LAYOUT_VERSION,
    SERVICE_CIDRS_MAP, SERVICES_MAP, SOCK_REVNAT_MAP, SOURCE_RANGES_MAP, ServiceKey, ServiceValue,
    SockRevNatKey, SockRevNatValue, VIPS_MAP,
};

use super::maps::{MapsError, access, collect, open};

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("moving the pin {from} to {to}: {source}")]
    Move {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error("removing the old pins in {path}: {source}")]
    RemoveOld {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the maps pinned under {path} have layout version {found}, newer than this proxy's \
         {MAP_LAYOUT_VERSION}: run the newer proxy, or `kube-ebpf-proxy cleanup` to start afresh"
    )]
    Newer { path: PathBuf, found: u32 },
}

/// What the pin directory holds before the programs are loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinnedLayout {
    /// No maps (a first start), or maps of the current layout.
    Current,
    /// Maps of an older layout, directly under the pin path.
    Old(u32),
}

/// The names layout 1 pinned directly under the pin path: every map of that release.
const V1_MAPS: [&str; 12] = [
    SERVICES_MAP,
    BACKENDS_MAP,
    CONNTRACK_MAP,
    AFFINITY_MAP,
    SOURCE_RANGES_MAP,
    LOCAL_CIDRS_MAP,
    LOCAL_IFINDEXES_MAP,
    SERVICE_CIDRS_MAP,
    VIPS_MAP,
    CONFIG_MAP,
    COUNTERS_MAP,
    SOCK_REVNAT_MAP,
];

/// The conntrack value of layout 1: the pinned ABI of that release, kept here (and only here)
/// to read its maps. States were NEW=0, ESTABLISHED=1, CLOSING=2; flags REPLY=1, SNAT=2,
/// SEEN_REPLY=4 (the same bits as today's).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValueV1 {
    pub nat_dst: proxy_common::Addr,
    pub nat_src: proxy_common::Addr,
    pub nat_dport: u16,
    pub nat_sport: u16,
    pub backend_id: u32,
    pub service_id: u32,
    pub state: u8,
    pub flags: u8,
    pub pad: [u8; 2],
    pub last_seen_ns: u64,
}

// SAFETY: plain `#[repr(C)]` data with explicit padding, as every map value.
unsafe impl aya::Pod for CtValueV1 {}

const V1_STATE_ESTABLISHED: u8 = 1;
const V1_STATE_CLOSING: u8 = 2;

/// A layout-1 conntrack value in today's layout. A NEW flow that saw a reply was up (layout 1
/// kept UDP replies and TCP handshakes alike as NEW + SEEN_REPLY until the next packet).
pub fn ct_value_from_v1(old: &CtValueV1) -> CtValue {
    let state = match old.state {
        V1_STATE_ESTABLISHED => CT_STATE_ESTABLISHED,
        V1_STATE_CLOSING => CT_STATE_FIN_WAIT,
        _ if old.flags & CT_F_SEEN_REPLY != 0 => CT_STATE_ESTABLISHED,
        _ => CT_STATE_SYN_SENT,
    };
    CtValue {
        nat_dst: old.nat_dst,
        nat_src: old.nat_src,
        nat_dport: old.nat_dport,
        nat_sport: old.nat_sport,
        backend_id: old.backend_id,
        service_id: old.service_id,
        state,
        flags: old.flags,
        _pad: [0; 2],
        last_seen_ns: old.last_seen_ns,
        // Layout 1 did not record it; the last packet is the best lower bound there is.
        created_ns: old.last_seen_ns,
    }
}

/// Where the pins of layout `version` are moved while they are migrated.
pub fn old_dir(pin_path: &Path, version: u32) -> PathBuf {
    pin_path.join(format!("old-v{version}"))
}

/// Reads the layout of what is pinned under `pin_path`: the `LAYOUT` map's version, or layout 1
/// when maps are pinned without one.
pub fn pinned_layout(pin_path: &Path) -> Result<PinnedLayout, MigrateError> {
    if pin_path.join(LAYOUT_MAP).exists() {
        let found = read_layout(pin_path)?;
        return match found {
            // 0: created by a start that stopped before stamping it; the maps are current.
            0 => Ok(PinnedLayout::Current),
            v if v == MAP_LAYOUT_VERSION => Ok(PinnedLayout::Current),
            v if v > MAP_LAYOUT_VERSION => Err(MigrateError::Newer {
                path: pin_path.to_owned(),
                found: v,
            }),
            v => Ok(PinnedLayout::Old(v)),
        };
    }
    if pin_path.join(CONNTRACK_MAP).exists() {
        return Ok(PinnedLayout::Old(1));
    }
    Ok(PinnedLayout::Current)
}

fn layout_map(pin_path: &Path) -> Result<Array<MapData, u32>, MapsError> {
    open(pin_path, LAYOUT_MAP, Map::Array)
}

fn read_layout(pin_path: &Path) -> Result<u32, MigrateError> {
    Ok(layout_map(pin_path)?
        .get(&0, 0)
        .map_err(access("read", LAYOUT_MAP))?)
}

/// Stamps the maps under `pin_path` with the current layout version.
pub fn write_layout(pin_path: &Path) -> Result<(), MigrateError> {
    layout_map(pin_path)?
        .set(0, MAP_LAYOUT_VERSION, 0)
        .map_err(access("write", LAYOUT_MAP))?;
    Ok(())
}

/// Moves the map pins of layout `version` from `pin_path` into [`old_dir`] (a rename on bpffs:
/// the maps, and the programs still using them, are untouched). An old directory left by an
/// earlier, interrupted migration is replaced: the pins just found are the newer state.
pub fn move_aside(pin_path: &Path, version: u32) -> Result<PathBuf, MigrateError> {
    let dir = old_dir(pin_path, version);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|source| MigrateError::RemoveOld {
            path: dir.clone(),
            source,
        })?;
    }
    std::fs::create_dir(&dir).map_err(|source| MigrateError::Move {
        from: pin_path.to_owned(),
        to: dir.clone(),
        source,
    })?;
    for name in V1_MAPS.iter().chain(&[LAYOUT_MAP]) {
        let from = pin_path.join(name);
        if !from.exists() {
            continue;
        }
        let to = dir.join(name);
        std::fs::rename(&from, &to).map_err(|source| MigrateError::Move { from, to, source })?;
    }
    Ok(dir)
}

/// How many entries one migration pass copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Migrated {
    pub conntrack: usize,
    pub affinity: usize,
    pub sock_revnat: usize,
    pub services: usize,
    pub backends: usize,
}

fn layout1_conntrack(old: &Path) -> Result<Vec<(CtKey, CtValue)>, MigrateError> {
    let map: HashMap<MapData, CtKey, CtValueV1> = open(old, CONNTRACK_MAP, Map::LruHashMap)?;
    Ok(collect(&map, CONNTRACK_MAP)?
        .iter()
        .map(|(k, v)| (*k, ct_value_from_v1(v)))
        .collect())
}

/// Copies every entry of the map `name` (same layout in both) from `old` to `new`.
fn copy_same_layout<K: aya::Pod, V: aya::Pod>(
    old: &Path,
    new: &Path,
    name: &'static str,
    wrap: fn(MapData) -> Map,
) -> Result<usize, MigrateError> {
    let from: HashMap<MapData, K, V> = open(old, name, wrap)?;
    let mut to: HashMap<MapData, K, V> = open(new, name, wrap)?;
    let entries = collect(&from, name)?;
    for (k, v) in &entries {
        to.insert(k, v, 0).map_err(access("insert", name))?;
    }
    Ok(entries.len())
}

/// The first pass, before anything runs over the new maps: conntrack entries converted, affinity
/// and socket reverse-NAT entries copied, and the service and backend entries copied so the ids
/// flows and affinity entries name keep their meaning (the reconciler resumes from them and
/// reprograms from the source whatever differs).
pub fn migrate_from(old: &Path, version: u32, new: &Path) -> Result<Migrated, MigrateError> {
    debug_assert_eq!(version, 1, "layout 1 is the only older layout");
    Ok(Migrated {
        conntrack: migrate_conntrack(old, new)?,
        affinity: copy_same_layout::<AffinityKey, AffinityValue>(
            old,
            new,
            AFFINITY_MAP,
            Map::LruHashMap,
        )?,
        sock_revnat: copy_same_layout::<SockRevNatKey, SockRevNatValue>(
            old,
            new,
            SOCK_REVNAT_MAP,
            Map::LruHashMap,
        )?,
        services: copy_same_layout::<ServiceKey, ServiceValue>(
            old,
            new,
            SERVICES_MAP,
            Map::HashMap,
        )?,
        backends: copy_same_layout::<u32, Backend>(old, new, BACKENDS_MAP, Map::HashMap)?,
    })
}

/// Copies the old conntrack entries, converted, into the new map: at the load, and again after
/// the new programs replaced the old ones (flows the old programs opened or advanced meanwhile).
/// An entry the new programs saw more recently than the old ones is kept. Returns the entries
/// copied.
pub fn migrate_conntrack(old: &Path, new: &Path) -> Result<usize, MigrateError> {
    let mut conntrack: HashMap<MapData, CtKey, CtValue> =
        open(new, CONNTRACK_MAP, Map::LruHashMap)?;
    let mut copied = 0;
    for (k, v) in layout1_conntrack(old)? {
        let newer_here = match conntrack.get(&k, 0) {
            Ok(current) => current.last_seen_ns >= v.last_seen_ns,
            Err(MapError::KeyNotFound) => false,
            Err(source) => return Err(access("lookup", CONNTRACK_MAP)(source).into()),
        };
        if !newer_here {
            conntrack
                .insert(k, v, 0)
                .map_err(access("insert", CONNTRACK_MAP))?;
            copied += 1;
        }
    }
    Ok(copied)
}

/// The pins of a migration that was interrupted (the proxy stopped between moving the old pins
/// aside and removing them), if any.
pub fn interrupted(pin_path: &Path) -> Option<(PathBuf, u32)> {
    (1..MAP_LAYOUT_VERSION)
        .map(|version| (old_dir(pin_path, version), version))
        .find(|(dir, _)| dir.join(CONNTRACK_MAP).exists())
}

/// Removes the old pins; their maps go once no program uses them.
pub fn remove_old(old: &Path) -> Result<(), MigrateError> {
    std::fs::remove_dir_all(old).map_err(|source| MigrateError::RemoveOld {
        path: old.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::{CT_F_REPLY, CT_F_SNAT};

    #[test]
    fn layout1_states_map_to_todays() {
        let cases: &[(u8, u8, u8)] = &[
            // (v1 state, v1 flags, expected state)
            (0, 0, CT_STATE_SYN_SENT),
            (0, CT_F_SEEN_REPLY, CT_STATE_ESTABLISHED),
            (1, 0, CT_STATE_ESTABLISHED),
            (1, CT_F_SEEN_REPLY | CT_F_SNAT, CT_STATE_ESTABLISHED),
            (2, CT_F_SEEN_REPLY, CT_STATE_FIN_WAIT),
            (1, CT_F_REPLY, CT_STATE_ESTABLISHED),
        ];
        for &(state, flags, expected) in cases {
            let old = CtValueV1 {
                state,
                flags,
                backend_id: 7,
                service_id: 3,
                nat_dport: 80,
                nat_sport: 4000,
                last_seen_ns: 42,
                ..CtValueV1::default()
            };
            let new = ct_value_from_v1(&old);
            assert_eq!(new.state, expected, "v1 state {state} flags {flags:#x}");
            assert_eq!(
                (
                    new.flags,
                    new.backend_id,
                    new.service_id,
                    new.nat_dport,
                    new.nat_sport
                ),
                (flags, 7, 3, 80, 4000)
            );
            assert_eq!((new.last_seen_ns, new.created_ns), (42, 42));
        }
        assert_eq!(size_of::<CtValueV1>(), 56, "layout 1's pinned value size");
    }
}
