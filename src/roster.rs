//! The members of a cluster at run time: a fixed number of slots, the
//! configured members first, then those a DCS names (Patroni's `members/`
//! keys). A slot, once given to a name, keeps that name for the life of the
//! process, so member ids in the view never change meaning; a learned
//! member's address follows what the DCS advertises.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{watch, Notify};

use crate::config::{self, PatroniApi};
use crate::probe::KnownAddress;
use crate::view::MemberId;

/// Where a member's entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Config,
    Dcs,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Config => "config",
            Origin::Dcs => "dcs",
        }
    }
}

/// One member: who it is and where to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberEntry {
    pub name: String,
    /// `host:port` of the database.
    pub address: String,
    /// Patroni's REST address, when known.
    pub api: Option<PatroniApi>,
    pub origin: Origin,
    /// `address`, resolved: to recognise the member when a replica names
    /// its upstream.
    pub resolved: Vec<SocketAddr>,
    /// Grows each time the slot's entry changes: what the view knows of the
    /// member is about one generation (see [`crate::view::Report`]).
    pub generation: u64,
}

/// What [`Roster::learn`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    /// The member was known with these facts already.
    Unchanged(MemberId),
    /// A new member took a free slot.
    Added(MemberId),
    /// A learned member advertises a new address or API.
    Moved(MemberId),
    /// A configured member: its configured address stands.
    Configured(MemberId),
    /// No slot left.
    Full,
}

/// The member slots of one cluster.
pub struct Roster {
    slots: Vec<watch::Sender<Option<Arc<MemberEntry>>>>,
    /// Per slot: the data path failed to reach the member where its probe's
    /// connection still works (see [`Roster::suspect`]).
    suspicions: Vec<Notify>,
    /// The last generation handed out.
    generations: AtomicU64,
}

impl Roster {
    /// The configured members in the first slots, the rest empty.
    pub fn new(cluster: &config::Cluster) -> Roster {
        let configured = cluster.members.iter().map(|m| {
            let known = KnownAddress::resolve(&m.address);
            Some(Arc::new(MemberEntry {
                name: m.name.clone(),
                address: m.address.clone(),
                api: m.api.clone(),
                origin: Origin::Config,
                resolved: known.resolved,
                generation: 0,
            }))
        });
        let free = (cluster.members.len()..cluster.member_slots()).map(|_| None);
        let slots: Vec<_> = configured.chain(free).map(watch::Sender::new).collect();
        Roster {
            suspicions: slots.iter().map(|_| Notify::new()).collect(),
            slots,
            generations: AtomicU64::new(0),
        }
    }

    /// The number of slots, filled or not.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn get(&self, id: MemberId) -> Option<Arc<MemberEntry>> {
        self.slots.get(id)?.borrow().clone()
    }

    /// The member's name, or `?` for an empty or unknown slot.
    pub fn name(&self, id: MemberId) -> String {
        self.get(id)
            .map_or_else(|| "?".to_string(), |m| m.name.clone())
    }

    /// Asks the member's probe to check it over a fresh connection: a new
    /// connection to it failed (timed out, or its certificate did not
    /// verify) although the probe's own, older connection may still work.
    /// Repeated suspicions before the probe wakes count once.
    pub fn suspect(&self, id: MemberId) {
        if let Some(suspicion) = self.suspicions.get(id) {
            suspicion.notify_one();
        }
    }

    /// Resolves when the member is suspected (see [`Roster::suspect`]);
    /// never for an unknown slot.
    pub async fn suspected(&self, id: MemberId) {
        match self.suspicions.get(id) {
            Some(suspicion) => suspicion.notified().await,
            None => std::future::pending().await,
        }
    }

    /// Follows one slot: its probe restarts when the entry changes.
    pub fn subscribe(&self, id: MemberId) -> Option<watch::Receiver<Option<Arc<MemberEntry>>>> {
        self.slots.get(id).map(watch::Sender::subscribe)
    }

    /// The filled slots, by id.
    pub fn members(&self) -> Vec<(MemberId, Arc<MemberEntry>)> {
        (0..self.slots.len())
            .filter_map(|id| self.get(id).map(|m| (id, m)))
            .collect()
    }

    pub fn id_of(&self, name: &str) -> Option<MemberId> {
        self.slots
            .iter()
            .position(|slot| slot.borrow().as_ref().is_some_and(|m| m.name == name))
    }

    /// The member listening at `host:port`, by its address text or by a
    /// resolved address.
    pub fn member_at(&self, host: &str, port: u16) -> Option<MemberId> {
        let text = format!("{host}:{port}");
        let position = |matches: &dyn Fn(&MemberEntry) -> bool| {
            self.slots
                .iter()
                .position(|s| s.borrow().as_deref().is_some_and(matches))
        };
        // The text first: two entries may resolve alike (a name and its IP).
        position(&|m| m.address == text).or_else(|| {
            let ip: IpAddr = host.parse().ok()?;
            let wanted = SocketAddr::new(ip, port);
            position(&|m| m.resolved.contains(&wanted))
        })
    }

    /// Records what a DCS advertises for `name`: a new member takes the
    /// first free slot, a learned member's address follows the DCS, a
    /// configured member keeps its configured address.
    pub fn learn(&self, name: &str, address: KnownAddress, api: Option<PatroniApi>) -> Learned {
        let entry = || MemberEntry {
            name: name.to_string(),
            address: address.configured.clone(),
            api: api.clone(),
            origin: Origin::Dcs,
            resolved: address.resolved.clone(),
            generation: self.generations.fetch_add(1, Ordering::Relaxed) + 1,
        };
        if let Some(id) = self.id_of(name) {
            let mut outcome = Learned::Unchanged(id);
            self.slots[id].send_if_modified(|slot| match slot {
                Some(current) if current.origin == Origin::Config => {
                    outcome = Learned::Configured(id);
                    false
                }
                Some(current) if current.address == address.configured && current.api == api => {
                    false
                }
                _ => {
                    *slot = Some(Arc::new(entry()));
                    outcome = Learned::Moved(id);
                    true
                }
            });
            return outcome;
        }
        for (id, slot) in self.slots.iter().enumerate() {
            let mut taken = false;
            slot.send_if_modified(|current| {
                if current.is_none() {
                    *current = Some(Arc::new(entry()));
                    taken = true;
                }
                taken
            });
            if taken {
                return Learned::Added(id);
            }
        }
        Learned::Full
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{Cluster, Dcs, EtcdDcs, Member, ProbeSettings, Protocol};
    use std::time::Duration;

    /// A cluster's configuration with these members (and a DCS that may
    /// add up to `max_members`).
    pub(crate) fn cluster(members: &[(&str, &str)], max_members: Option<usize>) -> Cluster {
        Cluster {
            name: "main".into(),
            protocol: Protocol::Postgres,
            probe: ProbeSettings {
                interval: Duration::from_secs(1),
                fast_interval: Duration::from_millis(100),
                timeout: Duration::from_secs(1),
                reconnect_interval: Duration::from_secs(30),
                rise: 1,
                fall: 1,
                username: None,
                password: None,
                dbname: "postgres".into(),
                check: Default::default(),
                api_tls: None,
            },
            backend_tls: None,
            members: members
                .iter()
                .map(|(name, address)| Member {
                    name: name.to_string(),
                    address: address.to_string(),
                    api: None,
                })
                .collect(),
            endpoints: Vec::new(),
            dcs: max_members.map(|max_members| {
                Dcs::Etcd(EtcdDcs {
                    endpoints: vec!["127.0.0.1:2379".into()],
                    prefix: "/service".into(),
                    scope: "main".into(),
                    username: None,
                    password: None,
                    timeout: Duration::from_secs(1),
                    max_members,
                    tls: None,
                })
            }),
        }
    }

    fn learn(roster: &Roster, name: &str, address: &str, api: Option<&str>) -> Learned {
        roster.learn(
            name,
            KnownAddress::resolve(address),
            api.and_then(|api| PatroniApi::parse(api, false)),
        )
    }

    #[test]
    fn configured_members_fill_the_first_slots() {
        let roster = Roster::new(&cluster(
            &[("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")],
            None,
        ));
        assert_eq!(roster.len(), 2);
        assert_eq!(roster.id_of("b"), Some(1));
        assert_eq!(roster.name(0), "a");
        assert_eq!(roster.name(7), "?");
        assert_eq!(roster.member_at("127.0.0.1", 2), Some(1));
        assert_eq!(roster.member_at("127.0.0.1", 3), None);
        assert_eq!(learn(&roster, "c", "127.0.0.1:3", None), Learned::Full);
    }

    #[test]
    fn learned_members_take_free_slots_and_keep_them() {
        let roster = Roster::new(&cluster(&[("a", "127.0.0.1:1")], Some(3)));
        assert_eq!(roster.len(), 3);
        assert_eq!(roster.members().len(), 1);
        assert_eq!(
            learn(&roster, "b", "127.0.0.1:2", Some("127.0.0.1:8008")),
            Learned::Added(1)
        );
        assert_eq!(
            learn(&roster, "b", "127.0.0.1:2", Some("127.0.0.1:8008")),
            Learned::Unchanged(1)
        );
        assert_eq!(learn(&roster, "c", "127.0.0.1:3", None), Learned::Added(2));
        assert_eq!(learn(&roster, "d", "127.0.0.1:4", None), Learned::Full);
        let b = roster.get(1).expect("b is in slot 1");
        assert_eq!(
            (b.origin, b.api.as_ref().map(ToString::to_string).as_deref()),
            (Origin::Dcs, Some("127.0.0.1:8008"))
        );
        assert_eq!(roster.member_at("127.0.0.1", 3), Some(2));
    }

    #[test]
    fn a_learned_member_follows_its_address_and_a_configured_one_does_not() {
        let roster = Roster::new(&cluster(&[("a", "127.0.0.1:1")], Some(2)));
        let mut slot = roster.subscribe(1).expect("slot 1 exists");
        assert_eq!(learn(&roster, "b", "127.0.0.1:2", None), Learned::Added(1));
        assert!(slot.has_changed().unwrap_or(false));
        slot.mark_unchanged();
        let first = roster.get(1).map_or(0, |m| m.generation);
        assert_eq!(learn(&roster, "b", "127.0.0.1:9", None), Learned::Moved(1));
        let moved = roster.get(1).map_or(0, |m| m.generation);
        assert!(moved > first && first > 0, "{first} then {moved}");
        assert!(slot.has_changed().unwrap_or(false));
        assert_eq!(roster.member_at("127.0.0.1", 9), Some(1));
        assert_eq!(roster.member_at("127.0.0.1", 2), None);

        let mut first = roster.subscribe(0).expect("slot 0 exists");
        first.mark_unchanged();
        assert_eq!(
            learn(&roster, "a", "127.0.0.1:7", None),
            Learned::Configured(0)
        );
        assert!(!first.has_changed().unwrap_or(true));
        assert_eq!(
            roster.get(0).map(|m| m.address.clone()).as_deref(),
            Some("127.0.0.1:1")
        );
    }
}
