//! The handle table. A C handle is a small struct holding a 64-bit id into this table, never a
//! pointer: a destroyed or forged handle is then a failed lookup (`KVFERRY_ERR_INVALID_HANDLE`)
//! rather than a use after free. Ids are never reused, so a double destroy is always detected.
//!
//! Every handle other than an agent records the agent it was made from. Destroying the agent
//! destroys them too, in an order that keeps memory safe: transfers (cancelled), descriptor lists,
//! peers, then registrations (whose drop waits for local transfers still using the memory).

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, PoisonError, RwLock};

use crate::status::{CResult, Failure, KVFERRY_ERR_INVALID_HANDLE};

/// The kinds of handle, in the order an agent's dependents are destroyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    Transfer,
    Descs,
    Peer,
    Registration,
    Agent,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Transfer => "transfer",
            Kind::Descs => "descriptor list",
            Kind::Peer => "peer",
            Kind::Registration => "registration",
            Kind::Agent => "agent",
        }
    }
}

/// A C handle type and the object its id names.
pub(crate) trait Handle: Copy {
    type Object: Any + Send + Sync;
    const KIND: Kind;
    fn id(self) -> u64;
    fn from_id(id: u64) -> Self;
}

struct Entry {
    kind: Kind,
    /// The agent this handle was made from (an agent's own id for agents).
    agent: u64,
    object: Arc<dyn Any + Send + Sync>,
}

static TABLE: LazyLock<RwLock<HashMap<u64, Entry>>> = LazyLock::new(Default::default);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

// Nothing panics while the lock is held, but a poisoned table must not take every later call down.
fn read() -> std::sync::RwLockReadGuard<'static, HashMap<u64, Entry>> {
    TABLE.read().unwrap_or_else(PoisonError::into_inner)
}

fn write() -> std::sync::RwLockWriteGuard<'static, HashMap<u64, Entry>> {
    TABLE.write().unwrap_or_else(PoisonError::into_inner)
}

fn invalid<H: Handle>(handle: H) -> Failure {
    let kind = H::KIND.name();
    Failure::new(
        KVFERRY_ERR_INVALID_HANDLE,
        format!("{kind} handle {} is not valid: never created, destroyed already, or not a {kind}", handle.id()),
    )
}

/// Register a new agent.
pub(crate) fn insert_agent<H: Handle>(object: Arc<H::Object>) -> H {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    write().insert(id, Entry { kind: H::KIND, agent: id, object });
    H::from_id(id)
}

/// Register an object made from `agent`; fails if the agent was destroyed meanwhile, so no
/// handle outlives its agent.
pub(crate) fn insert<H: Handle, A: Handle>(agent: A, object: Arc<H::Object>) -> CResult<H> {
    let mut table = write();
    if table.get(&agent.id()).is_none_or(|e| e.kind != A::KIND) {
        return Err(invalid(agent));
    }
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    table.insert(id, Entry { kind: H::KIND, agent: agent.id(), object });
    Ok(H::from_id(id))
}

/// The object behind a handle and the id of the agent it was made from.
pub(crate) fn lookup<H: Handle>(handle: H) -> CResult<(Arc<H::Object>, u64)> {
    let table = read();
    let entry = table.get(&handle.id()).filter(|e| e.kind == H::KIND).ok_or_else(|| invalid(handle))?;
    let object = entry.object.clone().downcast::<H::Object>().map_err(|_| invalid(handle))?;
    Ok((object, entry.agent))
}

pub(crate) fn get<H: Handle>(handle: H) -> CResult<Arc<H::Object>> {
    lookup(handle).map(|(object, _)| object)
}

/// Take a handle out of the table; the caller drops the object (outside the lock).
pub(crate) fn remove<H: Handle>(handle: H) -> CResult<Arc<H::Object>> {
    let mut table = write();
    match table.get(&handle.id()) {
        Some(e) if e.kind == H::KIND => {}
        _ => return Err(invalid(handle)),
    }
    let entry = table.remove(&handle.id()).expect("checked above");
    entry.object.downcast::<H::Object>().map_err(|_| invalid(handle))
}

/// Take an agent and every handle made from it out of the table, dependents first in
/// [`Kind`] order (the agent last).
pub(crate) fn remove_agent<H: Handle>(agent: H) -> CResult<Vec<(Kind, Arc<dyn Any + Send + Sync>)>> {
    let mut table = write();
    if table.get(&agent.id()).is_none_or(|e| e.kind != H::KIND) {
        return Err(invalid(agent));
    }
    let ids: Vec<u64> = table.iter().filter(|(_, e)| e.agent == agent.id()).map(|(id, _)| *id).collect();
    let mut removed: Vec<(Kind, Arc<dyn Any + Send + Sync>)> =
        ids.iter().filter_map(|id| table.remove(id)).map(|e| (e.kind, e.object)).collect();
    removed.sort_by_key(|(kind, _)| *kind);
    Ok(removed)
}

/// Implements [`Handle`] for a C handle struct whose only field is `id`.
macro_rules! handle {
    ($handle:ty, $object:ty, $kind:expr) => {
        impl $crate::handles::Handle for $handle {
            type Object = $object;
            const KIND: $crate::handles::Kind = $kind;
            fn id(self) -> u64 {
                self.id
            }
            fn from_id(id: u64) -> Self {
                Self { id }
            }
        }
    };
}
pub(crate) use handle;
