//! The synchronisation primitives of the WAL's group-commit protocol, in one place so they can
//! be swapped for loom's model-checked versions under `--cfg loom` (see `wal::loom_tests`).
//! Normal builds use parking_lot and std; the API is parking_lot's (a condvar waits on a
//! `&mut` guard).

#[cfg(not(loom))]
mod imp {
    pub(crate) use parking_lot::{Condvar as PlCondvar, Mutex, MutexGuard};
    pub(crate) use std::sync::Arc;
    pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    pub(crate) use std::thread::JoinHandle;
    use std::time::Duration;

    /// A condition variable (parking_lot's).
    #[derive(Default)]
    pub(crate) struct Condvar(PlCondvar);

    impl Condvar {
        pub(crate) fn new() -> Self {
            Condvar(PlCondvar::new())
        }
        pub(crate) fn wait<T>(&self, guard: &mut MutexGuard<'_, T>) {
            self.0.wait(guard);
        }
        pub(crate) fn wait_for<T>(&self, guard: &mut MutexGuard<'_, T>, timeout: Duration) {
            self.0.wait_for(guard, timeout);
        }
        pub(crate) fn notify_one(&self) {
            self.0.notify_one();
        }
        pub(crate) fn notify_all(&self) {
            self.0.notify_all();
        }
    }

    /// Lets other threads run (a short retry loop).
    pub(crate) fn yield_now() {
        std::thread::yield_now();
    }

    /// Starts a named OS thread.
    pub(crate) fn spawn(
        name: &str,
        f: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new().name(name.to_owned()).spawn(f)
    }
}

#[cfg(loom)]
mod imp {
    pub(crate) use loom::sync::Arc;
    pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    pub(crate) use loom::thread::JoinHandle;
    use std::ops::{Deref, DerefMut};
    use std::time::Duration;

    /// loom's mutex behind parking_lot's API (no poisoning).
    pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

    /// A guard that a condvar can take and give back.
    pub(crate) struct MutexGuard<'a, T>(Option<loom::sync::MutexGuard<'a, T>>);

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Mutex(loom::sync::Mutex::new(value))
        }
        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            MutexGuard(Some(self.0.lock().unwrap_or_else(|e| e.into_inner())))
        }
        pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
            match self.0.try_lock() {
                Ok(g) => Some(MutexGuard(Some(g))),
                Err(std::sync::TryLockError::Poisoned(e)) => Some(MutexGuard(Some(e.into_inner()))),
                Err(std::sync::TryLockError::WouldBlock) => None,
            }
        }
    }

    impl<T> Deref for MutexGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            self.0.as_ref().expect("guard present outside a wait")
        }
    }

    impl<T> DerefMut for MutexGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            self.0.as_mut().expect("guard present outside a wait")
        }
    }

    /// loom's condvar behind parking_lot's API.
    pub(crate) struct Condvar(loom::sync::Condvar);

    impl Condvar {
        pub(crate) fn new() -> Self {
            Condvar(loom::sync::Condvar::new())
        }
        pub(crate) fn wait<T>(&self, guard: &mut MutexGuard<'_, T>) {
            let inner = guard.0.take().expect("guard present");
            guard.0 = Some(self.0.wait(inner).unwrap_or_else(|e| e.into_inner()));
        }
        pub(crate) fn wait_for<T>(&self, guard: &mut MutexGuard<'_, T>, _timeout: Duration) {
            // loom has no time: a timed wait is a wait that may also end spuriously.
            self.wait(guard);
        }
        pub(crate) fn notify_one(&self) {
            self.0.notify_one();
        }
        pub(crate) fn notify_all(&self) {
            self.0.notify_all();
        }
    }

    /// Lets other threads run (loom explores the alternatives).
    pub(crate) fn yield_now() {
        loom::thread::yield_now();
    }

    /// Starts a loom thread.
    pub(crate) fn spawn(
        _name: &str,
        f: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<JoinHandle<()>> {
        Ok(loom::thread::spawn(f))
    }
}

pub(crate) use imp::*;
