//! A fetch-once cache: one fetch per key per `max_age`, shared by every caller, with concurrent
//! requests for the same key waiting on the fetch already in flight.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::OnceCell;

/// By default entries older than this are dropped when new ones arrive (longer than the longest interval).
const EVICT_AFTER: Duration = Duration::from_secs(25 * 3600);
/// Keys come from untrusted input (annotations name GSAs): beyond this many entries the older
/// half is dropped, whatever their age (far above 10,000 namespaces × 3 KSAs).
const MAX_ENTRIES: usize = 1 << 17;

#[derive(Debug)]
struct Slot<V> {
    started: Instant,
    value: OnceCell<V>,
}

/// Values by key, each fetched at most once per `max_age`.
#[derive(Debug)]
pub struct FetchCache<K, V> {
    slots: Mutex<HashMap<K, Arc<Slot<V>>>>,
    evict_after: Duration,
    max_entries: usize,
}

impl<K, V> Default for FetchCache<K, V> {
    fn default() -> Self {
        Self::evicting_after(EVICT_AFTER)
    }
}

impl<K, V> FetchCache<K, V> {
    /// A cache that drops entries older than `evict_after` whenever it is used.
    pub fn evicting_after(evict_after: Duration) -> Self {
        Self { slots: Mutex::new(HashMap::new()), evict_after, max_entries: MAX_ENTRIES }
    }
}

impl<K: Eq + Hash + Clone, V: Clone> FetchCache<K, V> {
    /// The value for `key`: cached when fetched less than `max_age` ago (or still in flight),
    /// fetched with `fetch` otherwise. Returns the value and the previous one it replaced.
    pub async fn get<F>(&self, key: &K, max_age: Duration, fetch: F) -> (V, Option<V>)
    where
        F: Future<Output = V>,
    {
        self.get_fresh(key, max_age, |_| true, fetch).await
    }

    /// Like [`FetchCache::get`], but a cached value is also refetched when `fresh` says it is not.
    pub async fn get_fresh<F>(
        &self,
        key: &K,
        max_age: Duration,
        fresh: impl Fn(&V) -> bool,
        fetch: F,
    ) -> (V, Option<V>)
    where
        F: Future<Output = V>,
    {
        let (slot, previous) = {
            let mut slots = match self.slots.lock() {
                Ok(s) => s,
                Err(poisoned) => poisoned.into_inner(),
            };
            let reusable = |slot: &Slot<V>| match slot.value.get() {
                None => true,
                Some(v) => slot.started.elapsed() < max_age && fresh(v),
            };
            match slots.get(key) {
                Some(slot) if reusable(slot) => (slot.clone(), None),
                existing => {
                    let previous = existing.and_then(|s| s.value.get().cloned());
                    let evict_after = self.evict_after;
                    slots.retain(|_, s| s.started.elapsed() < evict_after);
                    if slots.len() >= self.max_entries {
                        let mut ages: Vec<Instant> = slots.values().map(|s| s.started).collect();
                        ages.sort_unstable();
                        let cutoff = ages[ages.len() / 2];
                        slots.retain(|_, s| s.started > cutoff);
                    }
                    let slot = Arc::new(Slot { started: Instant::now(), value: OnceCell::new() });
                    slots.insert(key.clone(), slot.clone());
                    (slot, previous)
                }
            }
        };
        (slot.value.get_or_init(|| fetch).await.clone(), previous)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch_and_fresh_values_are_reused() {
        let cache: FetchCache<&str, u32> = FetchCache::default();
        let fetches = AtomicU32::new(0);
        let fetch = || async {
            fetches.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            7
        };
        let hour = Duration::from_secs(3600);
        let (a, b, c) = tokio::join!(
            cache.get(&"gsa", hour, fetch()),
            cache.get(&"gsa", hour, fetch()),
            cache.get(&"gsa", hour, fetch())
        );
        assert_eq!((a.0, b.0, c.0), (7, 7, 7));
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        assert_eq!(cache.get(&"gsa", hour, fetch()).await, (7, None));
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        // Too old for this caller: fetched again, and the replaced value is handed back.
        assert_eq!(cache.get(&"gsa", Duration::ZERO, async { 8 }).await, (8, Some(7)));
        assert_eq!(cache.get(&"other", hour, fetch()).await.0, 7);
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn untrusted_keys_cannot_grow_the_cache_without_bound() {
        let cache: FetchCache<u32, u32> = FetchCache { max_entries: 100, ..FetchCache::default() };
        let hour = Duration::from_secs(3600);
        for key in 0..1000 {
            cache.get(&key, hour, async { 1 }).await;
        }
        let kept = cache.slots.lock().unwrap().len();
        assert!(kept <= 100, "{kept} entries kept");
        assert!(cache.slots.lock().unwrap().contains_key(&999), "the newest stay");
    }
}
