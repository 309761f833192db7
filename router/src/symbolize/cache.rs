//! The symbolizer's answers, bounded: at most [`CacheLimits::entries`] answers and
//! [`CacheLimits::bytes`] of them, the least recently used dropped first when an interval ends.
//! Pure bookkeeping: no files, no blazesym.

use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
    mem,
};

use super::Symbol;

/// How much the symbolizer keeps between intervals.
///
/// ```
/// use router::symbolize::CacheLimits;
/// let small = CacheLimits { entries: 1_000, ..CacheLimits::default() };
/// assert!(small.entries < CacheLimits::default().entries);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheLimits {
    /// Answers kept (one per distinct kernel address or file offset).
    pub entries: usize,
    /// Estimated heap bytes of those answers.
    pub bytes: usize,
    /// Files blazesym keeps open and parsed.
    pub open_files: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self {
            entries: 32_768,
            bytes: 4 << 20,
            open_files: 32,
        }
    }
}

/// One answer and the interval that last needed it.
struct Entry {
    symbol: Option<Symbol>,
    last_used: u64,
}

impl Entry {
    /// The estimated heap bytes of an entry: its slot in the table (with the table's spare
    /// capacity and control byte) and its strings, each with the allocator's 16-byte header.
    fn bytes(&self) -> usize {
        let allocation = |capacity: usize| if capacity == 0 { 0 } else { capacity + 16 };
        let strings = self.symbol.as_ref().map_or(0, |s| {
            allocation(s.name.capacity()) + s.file.as_ref().map_or(0, |f| allocation(f.capacity()))
        });
        mem::size_of::<(u64, Entry)>() * 8 / 7 + 1 + strings
    }
}

/// Answers by object (the kernel, or a file) and address within it, bounded by
/// [`CacheLimits`] at the end of each interval.
pub(crate) struct SymbolCache<K> {
    objects: HashMap<K, HashMap<u64, Entry>>,
    entries: usize,
    bytes: usize,
    /// Intervals ended so far: the clock of `last_used`.
    now: u64,
    evicted: u64,
}

impl<K: Eq + Hash + Clone> SymbolCache<K> {
    /// An empty cache.
    pub(crate) fn new() -> Self {
        Self {
            objects: HashMap::new(),
            entries: 0,
            bytes: 0,
            now: 0,
            evicted: 0,
        }
    }

    /// The addresses of `wanted` in `object` that have no answer yet; those that have one
    /// are marked used in this interval.
    pub(crate) fn missing(&mut self, object: &K, wanted: &HashSet<u64>) -> Vec<u64> {
        let Some(cached) = self.objects.get_mut(object) else {
            return wanted.iter().copied().collect();
        };
        wanted
            .iter()
            .copied()
            .filter(|address| match cached.get_mut(address) {
                Some(entry) => {
                    entry.last_used = self.now;
                    false
                }
                None => true,
            })
            .collect()
    }

    /// Keeps `symbol` (`None`: the object has no symbol there) as the answer for `address`.
    pub(crate) fn insert(&mut self, object: &K, address: u64, symbol: Option<Symbol>) {
        let entry = Entry {
            symbol,
            last_used: self.now,
        };
        self.entries += 1;
        self.bytes += entry.bytes();
        let cached = match self.objects.get_mut(object) {
            Some(cached) => cached,
            None => self.objects.entry(object.clone()).or_default(),
        };
        if let Some(old) = cached.insert(address, entry) {
            self.entries -= 1;
            self.bytes -= old.bytes();
        }
    }

    /// The answer for `address` in `object`, when it has one and it is a symbol.
    pub(crate) fn get(&self, object: &K, address: u64) -> Option<&Symbol> {
        self.objects.get(object)?.get(&address)?.symbol.as_ref()
    }

    /// Ends an interval: drops the least recently used answers until `limits` hold.
    pub(crate) fn end_interval(&mut self, limits: &CacheLimits) {
        self.now += 1;
        if self.entries <= limits.entries && self.bytes <= limits.bytes {
            return;
        }
        let mut by_age: Vec<(u64, &K, u64)> = self
            .objects
            .iter()
            .flat_map(|(object, cached)| {
                cached
                    .iter()
                    .map(move |(&address, entry)| (entry.last_used, object, address))
            })
            .collect();
        by_age.sort_unstable_by_key(|&(last_used, ..)| last_used);
        let (mut entries, mut bytes) = (self.entries, self.bytes);
        let mut doomed: Vec<(K, u64)> = Vec::new();
        for (_, object, address) in by_age {
            if entries <= limits.entries && bytes <= limits.bytes {
                break;
            }
            entries -= 1;
            bytes -= self.objects[object][&address].bytes();
            doomed.push((object.clone(), address));
        }
        for (object, address) in doomed {
            let cached = self.objects.get_mut(&object).expect("listed above");
            cached.remove(&address);
            if cached.is_empty() {
                self.objects.remove(&object);
            }
        }
        self.evicted += (self.entries - entries) as u64;
        (self.entries, self.bytes) = (entries, bytes);
    }

    /// Answers held, their estimated bytes, and answers evicted so far.
    pub(crate) fn usage(&self) -> (usize, usize, u64) {
        (self.entries, self.bytes, self.evicted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn symbol(name: &str) -> Option<Symbol> {
        Some(Symbol {
            name: name.to_owned(),
            file: None,
            line: 0,
        })
    }

    fn limits(entries: usize) -> CacheLimits {
        CacheLimits {
            entries,
            bytes: usize::MAX,
            open_files: 1,
        }
    }

    #[test]
    fn the_least_recently_used_answers_go_first() {
        let mut cache = SymbolCache::new();
        for interval in 0..4u64 {
            cache.insert(&interval, 0x10, symbol(&format!("f{interval}")));
            cache.end_interval(&limits(8));
        }
        // Object 0 was needed again in the last interval: object 1 is now the oldest.
        assert!(cache.missing(&0, &HashSet::from([0x10])).is_empty());
        cache.end_interval(&limits(3));
        assert_eq!(cache.get(&0, 0x10).map(|s| &*s.name), Some("f0"));
        assert_eq!(cache.get(&1, 0x10), None);
        assert_eq!(cache.missing(&1, &HashSet::from([0x10])), vec![0x10]);
        assert_eq!(cache.get(&3, 0x10).map(|s| &*s.name), Some("f3"));
        assert_eq!(cache.usage().0, 3);
        assert_eq!(cache.usage().2, 1);
    }

    #[test]
    fn the_byte_bound_holds_and_accounting_returns_to_zero() {
        let mut cache = SymbolCache::new();
        let long = "x".repeat(1000);
        for address in 0..100 {
            cache.insert(&7u8, address, symbol(&long));
        }
        cache.insert(&7u8, 0, None);
        let (entries, bytes, _) = cache.usage();
        assert_eq!(entries, 100);
        assert!(bytes > 99 * 1000, "{bytes}");
        let budget = CacheLimits {
            entries: usize::MAX,
            bytes: 10_000,
            open_files: 1,
        };
        cache.end_interval(&budget);
        let (entries, bytes, evicted) = cache.usage();
        assert!(
            bytes <= 10_000 && entries < 10,
            "{entries} entries, {bytes} bytes"
        );
        assert_eq!(entries as u64 + evicted, 100);
        cache.end_interval(&limits(0));
        assert_eq!(cache.usage().0, 0);
        assert_eq!(cache.usage().1, 0);
        assert!(cache.objects.is_empty());
    }
}
