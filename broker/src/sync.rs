//! Locks that shrug off poisoning. A panic while a lock is held is a bug
//! the panic already reports; every other holder goes on with the data as
//! it was left, rather than turning one panic into many. One idiom, in one
//! place.
//!
//! Uses: nothing of the crate.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// [`Mutex::lock`] that never fails.
pub(crate) trait Lock<T: ?Sized> {
    /// The guard, poisoned or not.
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> Lock<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// [`RwLock::read`] and [`RwLock::write`] that never fail.
pub(crate) trait ReadWrite<T: ?Sized> {
    /// A shared guard, poisoned or not.
    fn reading(&self) -> RwLockReadGuard<'_, T>;
    /// The exclusive guard, poisoned or not.
    fn writing(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T: ?Sized> ReadWrite<T> for RwLock<T> {
    fn reading(&self) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(|p| p.into_inner())
    }

    fn writing(&self) -> RwLockWriteGuard<'_, T> {
        self.write().unwrap_or_else(|p| p.into_inner())
    }
}
