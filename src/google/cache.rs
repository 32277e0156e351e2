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
/// Expired entries are dropped at most this many times per eviction age, not on every new key: a
/// scan of every entry per new key made the exchange cache quadratic (at 10k × 3 with the live
/// chain, 30,000 entries scanned for each of 500 exchanges a minute).
const SWEEPS_PER_EVICTION: u32 = 64;
/// Keys come from untrusted input (annotations name GSAs): beyond this many entries the older
/// half is dropped, whatever their age (far above 10,000 namespaces × 3 KSAs).
const MAX_ENTRIES: usize = 1 << 17;

#[derive(Debug)]
struct Slot<V> {
    started: Instant,
    value: OnceCell<V>,
}

#[derive(Debug)]
struct Slots<K, V> {
    by_key: HashMap<K, Arc<Slot<V>>>,
    /// When expired entries are dropped next.
    next_sweep: Instant,
}

/// Values by key, each fetched at most once per `max_age`.
#[derive(Debug)]
pub struct FetchCache<K, V> {
    slots: Mutex<Slots<K, V>>,
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
        let slots = Slots { by_key: HashMap::new(), next_sweep: Instant::now() };
        Self { slots: Mutex::new(slots), evict_after, max_entries: MAX_ENTRIES }
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
            match slots.by_key.get(key) {
                Some(slot) if reusable(slot) => (slot.clone(), None),
                existing => {
                    let previous = existing.and_then(|s| s.value.get().cloned());
                    let now = Instant::now();
                    if now >= slots.next_sweep {
                        let evict_after = self.evict_after;
                        slots.by_key.retain(|_, s| now.duration_since(s.started) < evict_after);
                        slots.next_sweep = now + evict_after / SWEEPS_PER_EVICTION;
                    }
                    if slots.by_key.len() >= self.max_entries {
                        let mut ages: Vec<Instant> = slots.by_key.values().map(|s| s.started).collect();
                        ages.sort_unstable();
                        let cutoff = ages[ages.len() / 2];
                        slots.by_key.retain(|_, s| s.started > cutoff);
                    }
                    let slot = Arc::new(Slot { started: now, value: OnceCell::new() });
                    slots.by_key.insert(key.clone(), slot.clone());
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
        let kept = cache.slots.lock().unwrap().by_key.len();
        assert!(kept <= 100, "{kept} entries kept");
        assert!(cache.slots.lock().unwrap().by_key.contains_key(&999), "the newest stay");
    }

    #[tokio::test]
    async fn expired_entries_are_dropped_by_the_next_sweep() {
        let evict_after = Duration::from_millis(640);
        let cache: FetchCache<u32, u32> = FetchCache::evicting_after(evict_after);
        let keys = |cache: &FetchCache<u32, u32>| {
            let mut k: Vec<u32> = cache.slots.lock().unwrap().by_key.keys().copied().collect();
            k.sort_unstable();
            k
        };
        cache.get(&1, evict_after, async { 1 }).await;
        tokio::time::sleep(evict_after).await;
        // The first key's sweep was due at once: the next is an eviction age / 64 later.
        cache.get(&2, evict_after, async { 2 }).await;
        assert_eq!(keys(&cache), [2], "an entry older than the eviction age is dropped");
        cache.get(&3, evict_after, async { 3 }).await;
        assert_eq!(keys(&cache), [2, 3], "a young entry stays");
    }
}
