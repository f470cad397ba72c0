//! Per-volume serialization: calls on the same key wait for each other, briefly; calls on
//! different keys run in parallel. Entries vanish when unused.
//!
//! A call that finds its volume busy for longer than the wait answers ABORTED (the CSI spec's
//! "operation pending for volume"): the caller retries with backoff instead of queueing behind a
//! long mkfs or copy, and a stuck operation never piles up callers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use crate::error::{Error, Result};

/// How long a call waits for another operation on the same key before answering ABORTED:
/// long enough that duplicate calls of a quick operation both succeed.
pub const BUSY_WAIT: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct LockMap {
    inner: Arc<Mutex<HashMap<String, Arc<AsyncMutex<()>>>>>,
    wait: Duration,
}

impl Default for LockMap {
    fn default() -> Self {
        Self::with_wait(BUSY_WAIT)
    }
}

/// Held for the duration of one operation on one key.
pub struct VolumeGuard {
    key: String,
    map: LockMap,
    guard: Option<OwnedMutexGuard<()>>,
}

impl LockMap {
    pub fn with_wait(wait: Duration) -> Self {
        LockMap {
            inner: Arc::default(),
            wait,
        }
    }

    /// Holds `key` until the guard drops; `Error::Busy` if another operation holds it for
    /// longer than the wait.
    pub async fn lock(&self, key: impl Into<String>) -> Result<VolumeGuard> {
        let key = key.into();
        let mutex = {
            let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        // Dropping the mutex handle on the busy path lets the entry be cleaned up by its holder.
        let guard = tokio::time::timeout(self.wait, mutex.lock_owned())
            .await
            .map_err(|_| Error::Busy(key.clone()))?;
        Ok(VolumeGuard {
            key,
            map: self.clone(),
            guard: Some(guard),
        })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().unwrap().len()
    }
}

impl Drop for VolumeGuard {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.map.inner.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map itself still holds the mutex: nobody waits, forget it.
        if map
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn same_key_is_serialized_and_entries_are_removed() {
        let locks = LockMap::default();
        let inside = Arc::new(AtomicUsize::new(0));
        let max_inside = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (locks, inside, max_inside) = (locks.clone(), inside.clone(), max_inside.clone());
            tasks.push(tokio::spawn(async move {
                let _g = locks
                    .lock("vol")
                    .await
                    .expect("quick holders never make it busy");
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                max_inside.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(max_inside.load(Ordering::SeqCst), 1);
        assert_eq!(locks.len(), 0);
    }

    #[tokio::test]
    async fn different_keys_do_not_wait() {
        let locks = LockMap::default();
        let _a = locks.lock("a").await.unwrap();
        let _b = tokio::time::timeout(Duration::from_secs(1), locks.lock("b"))
            .await
            .expect("another key never waits")
            .expect("another key is never busy");
        assert_eq!(locks.len(), 2);
    }

    #[tokio::test]
    async fn a_key_held_past_the_wait_is_busy() {
        let locks = LockMap::with_wait(Duration::from_millis(50));
        let held = locks.lock("vol").await.unwrap();
        match locks.lock("vol").await {
            Err(Error::Busy(key)) => assert_eq!(key, "vol"),
            Err(e) => panic!("expected Busy, got {e:?}"),
            Ok(_) => panic!("a held key was handed out twice"),
        }
        drop(held);
        assert_eq!(locks.len(), 0, "the busy caller left its entry behind");
        let _again = locks.lock("vol").await.expect("free once released");
    }
}
