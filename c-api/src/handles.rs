//! The handle table. A C handle is a small struct holding a 64-bit id into this table, never a
//! pointer: a destroyed or forged handle is then a failed lookup (`KVFERRY_ERR_INVALID_HANDLE`)
//! rather than a use after free. Ids are never reused, so a double destroy is always detected.
//!
//! A handle is either a root (an agent or a tier store) or made from one, whose id it records.
//! Destroying a root destroys what was made from it too, in an order that keeps memory safe: an
//! agent's transfers (cancelled), descriptor lists, peers, then registrations (whose drop waits for
//! local transfers still using the memory); a store's operations, then the store (whose drop runs
//! every submitted operation to the end).

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, PoisonError, RwLock};

use crate::status::{CResult, Failure, KVFERRY_ERR_INVALID_HANDLE};

/// The kinds of handle, in the order a root's dependents are destroyed (roots last).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    Transfer,
    StoreOp,
    Descs,
    Peer,
    Registration,
    Agent,
    Store,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Transfer => "transfer",
            Kind::Descs => "descriptor list",
            Kind::Peer => "peer",
            Kind::Registration => "registration",
            Kind::Agent => "agent",
            Kind::StoreOp => "store operation",
            Kind::Store => "tier store",
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
    /// The root this handle was made from (a root's own id for roots).
    root: u64,
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

/// The entry of `handle`, if it is live and of its kind.
fn entry<H: Handle>(table: &HashMap<u64, Entry>, handle: H) -> CResult<&Entry> {
    table.get(&handle.id()).filter(|e| e.kind == H::KIND).ok_or_else(|| invalid(handle))
}

/// Register a new root object.
pub(crate) fn insert_root<H: Handle>(object: Arc<H::Object>) -> H {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    write().insert(id, Entry { kind: H::KIND, root: id, object });
    H::from_id(id)
}

/// Register an object made from `root`; fails if the root was destroyed meanwhile, so no handle
/// outlives its root.
pub(crate) fn insert<H: Handle, R: Handle>(root: R, object: Arc<H::Object>) -> CResult<H> {
    let mut table = write();
    entry(&table, root)?;
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    table.insert(id, Entry { kind: H::KIND, root: root.id(), object });
    Ok(H::from_id(id))
}

/// The object behind a handle and the id of the root it was made from.
pub(crate) fn lookup<H: Handle>(handle: H) -> CResult<(Arc<H::Object>, u64)> {
    let table = read();
    let entry = entry(&table, handle)?;
    let object = entry.object.clone().downcast::<H::Object>().map_err(|_| invalid(handle))?;
    Ok((object, entry.root))
}

pub(crate) fn get<H: Handle>(handle: H) -> CResult<Arc<H::Object>> {
    lookup(handle).map(|(object, _)| object)
}

/// Take a handle out of the table; the caller drops the object (outside the lock).
pub(crate) fn remove<H: Handle>(handle: H) -> CResult<Arc<H::Object>> {
    let mut table = write();
    entry(&table, handle)?;
    let entry = table.remove(&handle.id()).expect("checked above");
    entry.object.downcast::<H::Object>().map_err(|_| invalid(handle))
}

/// Take a root and every handle made from it out of the table, dependents first in [`Kind`] order
/// (the root last).
pub(crate) fn remove_root<H: Handle>(root: H) -> CResult<Vec<(Kind, Arc<dyn Any + Send + Sync>)>> {
    let mut table = write();
    entry(&table, root)?;
    let mut removed: Vec<(Kind, Arc<dyn Any + Send + Sync>)> =
        table.extract_if(|_, e| e.root == root.id()).map(|(_, e)| (e.kind, e.object)).collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy)]
    struct Root {
        id: u64,
    }
    handle!(Root, String, Kind::Agent);

    #[derive(Debug, Clone, Copy)]
    struct Registration {
        id: u64,
    }
    handle!(Registration, u32, Kind::Registration);

    #[derive(Debug, Clone, Copy)]
    struct Transfer {
        id: u64,
    }
    handle!(Transfer, u32, Kind::Transfer);

    #[test]
    fn destroyed_forged_and_mistyped_handles_are_refused() {
        let root: Root = insert_root(Arc::new("root".to_string()));
        let reg: Registration = insert(root, Arc::new(7)).unwrap();
        assert_eq!(*get(reg).unwrap(), 7);
        assert_eq!(lookup(reg).unwrap().1, root.id);
        assert_eq!(get(Transfer { id: reg.id }).unwrap_err().code, KVFERRY_ERR_INVALID_HANDLE);
        assert_eq!(get(Root { id: 0 }).unwrap_err().code, KVFERRY_ERR_INVALID_HANDLE);
        assert_eq!(*remove(reg).unwrap(), 7);
        assert_eq!(remove(reg).unwrap_err().code, KVFERRY_ERR_INVALID_HANDLE);
        // Ids are not reused, so the stale copy stays invalid after new inserts.
        let next: Registration = insert(root, Arc::new(8)).unwrap();
        assert_ne!(next.id, reg.id);
        assert!(get(reg).is_err());
        remove_root(root).unwrap();
    }

    #[test]
    fn a_root_takes_its_dependents_along_in_safe_order() {
        let root: Root = insert_root(Arc::new("root".to_string()));
        let other: Root = insert_root(Arc::new("other".to_string()));
        let reg: Registration = insert(root, Arc::new(1)).unwrap();
        let transfer: Transfer = insert(root, Arc::new(2)).unwrap();
        let unrelated: Transfer = insert(other, Arc::new(3)).unwrap();

        let kinds: Vec<Kind> = remove_root(root).unwrap().into_iter().map(|(kind, _)| kind).collect();
        assert_eq!(kinds, [Kind::Transfer, Kind::Registration, Kind::Agent]);
        assert!(get(reg).is_err() && get(transfer).is_err());
        assert_eq!(remove_root(root).unwrap_err().code, KVFERRY_ERR_INVALID_HANDLE);
        // Nothing can be made from a destroyed root, so nothing is left behind in the table.
        assert_eq!(insert::<Registration, _>(root, Arc::new(4)).unwrap_err().code, KVFERRY_ERR_INVALID_HANDLE);
        assert_eq!(*get(unrelated).unwrap(), 3);
        remove_root(other).unwrap();
    }

    #[derive(Debug, Clone, Copy)]
    struct Store {
        id: u64,
    }
    handle!(Store, String, Kind::Store);

    #[derive(Debug, Clone, Copy)]
    struct StoreOp {
        id: u64,
    }
    handle!(StoreOp, u32, Kind::StoreOp);

    #[test]
    fn a_store_is_a_root_of_its_own() {
        let store: Store = insert_root(Arc::new("store".to_string()));
        let op: StoreOp = insert(store, Arc::new(1)).unwrap();
        // A store is not an agent, nor an operation a transfer.
        assert_eq!(get(Root { id: store.id }).unwrap_err().code, KVFERRY_ERR_INVALID_HANDLE);
        assert_eq!(get(Transfer { id: op.id }).unwrap_err().code, KVFERRY_ERR_INVALID_HANDLE);
        let kinds: Vec<Kind> = remove_root(store).unwrap().into_iter().map(|(kind, _)| kind).collect();
        assert_eq!(kinds, [Kind::StoreOp, Kind::Store]);
        assert!(get(op).is_err());
    }
}
