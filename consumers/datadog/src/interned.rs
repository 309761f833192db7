//! A table of distinct slices (strings as bytes, stacks as location ids), each held once: the
//! slices lie end to end in one buffer, and the index finds one by its hash and compares it
//! where it lies, so no slice is kept twice (as a map key and in the table) nor allocated on
//! its own. A minute of a busy host's stacks took 200 bytes each as boxed map keys.

use std::hash::{BuildHasher, Hash, RandomState};

use hashbrown::HashTable;

/// Distinct slices of `T`, numbered from 0 in the order first seen.
pub struct SliceTable<T> {
    items: Vec<T>,
    /// (offset in `items`, length) of each slice, by number.
    spans: Vec<(u32, u32)>,
    index: HashTable<u32>,
    hasher: RandomState,
}

impl<T> Default for SliceTable<T> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            spans: Vec::new(),
            index: HashTable::new(),
            hasher: RandomState::new(),
        }
    }
}

impl<T: Copy + Eq + Hash> SliceTable<T> {
    /// The number of `slice`, added when it is new.
    ///
    /// ```
    /// let mut table = consumer_datadog::interned::SliceTable::default();
    /// assert_eq!(table.intern(b"main"), 0);
    /// assert_eq!(table.intern(b"spin"), 1);
    /// assert_eq!(table.intern(b"main"), 0);
    /// assert_eq!(table.get(1), b"spin");
    /// ```
    pub fn intern(&mut self, slice: &[T]) -> u32 {
        let hash = self.hasher.hash_one(slice);
        let Self {
            items,
            spans,
            index,
            hasher,
        } = self;
        let at = |n: u32| {
            let (offset, len) = spans[n as usize];
            &items[offset as usize..(offset + len) as usize]
        };
        if let Some(&n) = index.find(hash, |&n| at(n) == slice) {
            return n;
        }
        let n = spans.len() as u32;
        spans.push((items.len() as u32, slice.len() as u32));
        items.extend_from_slice(slice);
        let (items, spans) = (&*items, &*spans);
        index.insert_unique(hash, n, |&n| {
            let (offset, len) = spans[n as usize];
            hasher.hash_one(&items[offset as usize..(offset + len) as usize])
        });
        n
    }

    /// Slice number `n`.
    pub fn get(&self, n: u32) -> &[T] {
        let (offset, len) = self.spans[n as usize];
        &self.items[offset as usize..(offset + len) as usize]
    }

    /// The slices, in the order of their numbers.
    pub fn iter(&self) -> impl Iterator<Item = &[T]> {
        (0..self.spans.len() as u32).map(|n| self.get(n))
    }

    /// Number of distinct slices.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether the table holds no slice.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_distinct_slice_is_held_once_and_keeps_its_number() {
        let mut table = SliceTable::default();
        let stacks: Vec<Vec<u32>> = (0..5_000u32).map(|i| (0..i % 40).collect()).collect();
        let numbers: Vec<u32> = stacks.iter().map(|s| table.intern(s)).collect();
        assert_eq!(
            table.len(),
            40,
            "40 distinct stacks, the empty one among them"
        );
        for (stack, &n) in stacks.iter().zip(&numbers) {
            assert_eq!(table.get(n), &stack[..]);
            assert_eq!(table.intern(stack), n);
        }
        assert_eq!(table.items.len(), (0..40).sum::<usize>());
        assert_eq!(table.iter().count(), 40);
    }
}
