//! The places a caller can hold: a connection among `MAX_CONNECTIONS`, a call among
//! `MAX_CONCURRENT_CALLS`. Each has a cap in all and a fair share per peer, and a place held
//! by a holder that is not using it is the first to be taken back.
//!
//! [`Places::take`] gives a newcomer a place when there is one. When its peer already holds
//! its share, or every place is held, the newcomer takes back the place of the holder that
//! ranks first by [`Holder::standing`], among that peer's holders or among everyone's. A holder
//! using its place (a connection with a call in progress, a call whose message has arrived)
//! stands `None` and is never taken back; with no one to take back from, the newcomer is
//! refused. The place changes hands at once: the holder taken back is told and lets go of
//! its resources as soon as its task runs.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;

/// What a peer is, for the fair shares (`PEER_KEY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PeerKey {
    /// The connection's source IP address (an IPv4-mapped IPv6 address as IPv4).
    Address,
    /// No per-peer shares: behind a proxy, where every connection comes from one address.
    None,
}

impl PeerKey {
    /// The peer a connection from `addr` belongs to; `None` when peers are not told apart.
    pub(crate) fn peer(self, addr: SocketAddr) -> Option<IpAddr> {
        match self {
            Self::Address => Some(addr.ip().to_canonical()),
            Self::None => None,
        }
    }
}

/// How readily a place is taken back: lower first (by tier, then the older first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Standing {
    /// 0 is taken back before 1.
    pub tier: u8,
    /// Within a tier, the earlier first.
    pub since: Instant,
}

/// One who holds a place.
pub(crate) trait Holder: Send + 'static {
    /// How readily its place may be taken back; `None` while it is in use.
    fn standing(&self) -> Option<Standing>;

    /// Takes its place back (`why`: the newcomer found the places crowded so), telling it;
    /// false when it began using the place meanwhile (it keeps it). Called with the places
    /// locked: it must not block nor take a place.
    fn take_back(&self, why: Crowded) -> bool;
}

/// Why a newcomer found no free place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Crowded {
    /// Every place is held.
    Full,
    /// Its peer holds its share.
    PeerShare,
}

impl Crowded {
    /// The value of a metric's `reason` label: `cap` (the cap's name) or `peer_share`.
    pub(crate) fn label(self, cap: &'static str) -> &'static str {
        match self {
            Self::Full => cap,
            Self::PeerShare => "peer_share",
        }
    }
}

/// A place given: and, when it was taken back from another holder, why.
pub(crate) struct Taken<H: Holder> {
    /// The place, held until dropped.
    pub place: Place<H>,
    /// Set when the place was taken back from another holder.
    pub took_back: Option<Crowded>,
}

/// A bounded set of places with a share per peer.
pub(crate) struct Places<H: Holder> {
    state: Mutex<State<H>>,
    max: usize,
    per_peer: usize,
    /// The gauge counting the places held, if any.
    gauge: Option<&'static str>,
}

struct State<H> {
    holders: HashMap<u64, Entry<H>>,
    peers: HashMap<IpAddr, usize>,
    next_id: u64,
}

struct Entry<H> {
    peer: Option<IpAddr>,
    holder: H,
}

impl<H> State<H> {
    fn remove(&mut self, id: u64) -> bool {
        let Some(entry) = self.holders.remove(&id) else {
            return false;
        };
        if let Some(peer) = entry.peer
            && let Some(held) = self.peers.get_mut(&peer)
        {
            *held -= 1;
            if *held == 0 {
                self.peers.remove(&peer);
            }
        }
        true
    }
}

/// How many places there are, and how many one peer may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Places in all.
    pub max: usize,
    /// Places one peer may hold (at most `max`).
    pub per_peer: usize,
}

impl<H: Holder> Places<H> {
    /// Places as `caps` says; `gauge` counts them.
    pub fn new(caps: Caps, gauge: Option<&'static str>) -> Arc<Self> {
        let Caps { max, per_peer } = caps;
        Arc::new(Self {
            state: Mutex::new(State {
                holders: HashMap::new(),
                peers: HashMap::new(),
                next_id: 0,
            }),
            max,
            per_peer: per_peer.min(max),
            gauge,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<H>> {
        // The state is consistent between statements: a panic elsewhere leaves it usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for `holder` of `peer`: a free one, or one taken back (see the module docs).
    pub fn take(self: &Arc<Self>, peer: Option<IpAddr>, holder: H) -> Result<Taken<H>, Crowded> {
        let mut state = self.lock();
        let crowded = match peer {
            // A share as large as the cap is no share: the cap is what is crowded.
            Some(peer)
                if self.per_peer < self.max
                    && state.peers.get(&peer).copied().unwrap_or(0) >= self.per_peer =>
            {
                Some(Crowded::PeerShare)
            }
            _ if state.holders.len() >= self.max => Some(Crowded::Full),
            _ => None,
        };
        if let Some(crowded) = crowded {
            let mine = |entry: &Entry<H>| crowded == Crowded::Full || entry.peer == peer;
            if !self.take_back_one(&mut state, crowded, mine) {
                return Err(crowded);
            }
        }
        let id = state.next_id;
        state.next_id += 1;
        state.holders.insert(id, Entry { peer, holder });
        if let Some(peer) = peer {
            *state.peers.entry(peer).or_insert(0) += 1;
        }
        drop(state);
        if let Some(gauge) = self.gauge {
            metrics::gauge!(gauge).increment(1.0);
        }
        Ok(Taken {
            place: Place {
                places: self.clone(),
                id,
            },
            took_back: crowded,
        })
    }

    /// Takes back the place of the first-ranked holder among those `eligible`; false when
    /// none may be taken back.
    fn take_back_one(
        &self,
        state: &mut State<H>,
        why: Crowded,
        eligible: impl Fn(&Entry<H>) -> bool,
    ) -> bool {
        let mut candidates: Vec<(Standing, u64)> = state
            .holders
            .iter()
            .filter(|(_, entry)| eligible(entry))
            .filter_map(|(id, entry)| entry.holder.standing().map(|s| (s, *id)))
            .collect();
        candidates.sort_unstable();
        for (_, id) in candidates {
            if state.holders[&id].holder.take_back(why) {
                state.remove(id);
                if let Some(gauge) = self.gauge {
                    metrics::gauge!(gauge).decrement(1.0);
                }
                return true;
            }
        }
        false
    }

    /// Places held now.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.lock().holders.len()
    }
}

/// A place held; given back when dropped (unless it was taken back first).
pub(crate) struct Place<H: Holder> {
    places: Arc<Places<H>>,
    id: u64,
}

impl<H: Holder> Drop for Place<H> {
    fn drop(&mut self) {
        let removed = self.places.lock().remove(self.id);
        if removed && let Some(gauge) = self.places.gauge {
            metrics::gauge!(gauge).decrement(1.0);
        }
    }
}

impl<H: Holder> std::fmt::Debug for Place<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Place").field("id", &self.id).finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;

    /// A holder whose standing the test sets.
    #[derive(Clone)]
    struct Test(Arc<TestState>);

    struct TestState {
        standing: Mutex<Option<Standing>>,
        taken_back: AtomicBool,
    }

    impl Test {
        fn new(standing: Option<(u8, u64)>) -> Self {
            let base = Instant::now();
            Self(Arc::new(TestState {
                standing: Mutex::new(standing.map(|(tier, secs)| Standing {
                    tier,
                    since: base + Duration::from_secs(secs),
                })),
                taken_back: AtomicBool::new(false),
            }))
        }

        fn taken_back(&self) -> bool {
            self.0.taken_back.load(Ordering::SeqCst)
        }
    }

    impl Holder for Test {
        fn standing(&self) -> Option<Standing> {
            *self.0.standing.lock().unwrap()
        }

        fn take_back(&self, _: Crowded) -> bool {
            self.0.taken_back.store(true, Ordering::SeqCst);
            true
        }
    }

    fn peer(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([127, 0, 0, last]))
    }

    #[tokio::test]
    async fn a_full_set_takes_back_the_lowest_tier_then_the_oldest_and_never_one_in_use() {
        let places = Places::new(
            Caps {
                max: 3,
                per_peer: 3,
            },
            None,
        );
        let busy = Test::new(None);
        let idle_old = Test::new(Some((1, 0)));
        let silent_new = Test::new(Some((0, 5)));
        let _held: Vec<_> = [busy.clone(), idle_old.clone(), silent_new.clone()]
            .into_iter()
            .enumerate()
            .map(|(i, h)| places.take(peer(i as u8 + 1), h).ok().unwrap())
            .collect();

        let taken = places.take(peer(9), Test::new(None)).ok().unwrap();
        assert_eq!(taken.took_back, Some(Crowded::Full));
        assert!(silent_new.taken_back(), "tier 0 goes first, however recent");
        let _second = places.take(peer(9), Test::new(None)).ok().unwrap();
        assert!(idle_old.taken_back());
        assert!(!busy.taken_back());
        assert_eq!(places.held(), 3);

        assert_eq!(
            places.take(peer(9), Test::new(None)).err(),
            Some(Crowded::Full),
            "every place is in use"
        );
        drop(taken);
        assert!(places.take(peer(9), Test::new(None)).is_ok());
    }

    #[tokio::test]
    async fn a_peer_at_its_share_takes_back_only_its_own() {
        let places = Places::new(
            Caps {
                max: 10,
                per_peer: 2,
            },
            None,
        );
        let other = Test::new(Some((0, 0)));
        let _other = places.take(peer(1), other.clone()).ok().unwrap();
        let mine_busy = Test::new(None);
        let mine_idle = Test::new(Some((1, 3)));
        let _a = places.take(peer(2), mine_busy.clone()).ok().unwrap();
        let _b = places.take(peer(2), mine_idle.clone()).ok().unwrap();

        let taken = places.take(peer(2), Test::new(None)).ok().unwrap();
        assert_eq!(taken.took_back, Some(Crowded::PeerShare));
        assert!(mine_idle.taken_back());
        assert!(!other.taken_back(), "another peer's place is not touched");
        assert_eq!(
            places.take(peer(2), Test::new(None)).err(),
            Some(Crowded::PeerShare)
        );
        // Without peers told apart, only the cap applies.
        for _ in 0..7 {
            std::mem::forget(places.take(None, Test::new(None)).ok().unwrap());
        }
        assert_eq!(places.held(), 10);
    }

    #[tokio::test]
    async fn a_place_taken_back_is_not_given_back_twice() {
        let places = Places::new(
            Caps {
                max: 1,
                per_peer: 1,
            },
            None,
        );
        let first = places.take(peer(1), Test::new(Some((0, 0)))).ok().unwrap();
        let second = places.take(peer(1), Test::new(None)).ok().unwrap();
        drop(first);
        assert_eq!(
            places.held(),
            1,
            "the first's drop leaves the second's place"
        );
        drop(second);
        assert_eq!(places.held(), 0);
        assert_eq!(places.lock().peers.len(), 0);
    }

    #[test]
    fn peers_are_addresses_or_nothing() {
        let v4: SocketAddr = "127.0.0.2:5000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.2]:6000".parse().unwrap();
        assert_eq!(PeerKey::Address.peer(v4), PeerKey::Address.peer(mapped));
        assert_eq!(PeerKey::None.peer(v4), None);
    }
}
