//! Which runs of the probe's row array are free: first fit, with neighbours merged on free.

use std::collections::BTreeMap;

/// Free runs of a fixed-size array of rows.
#[derive(Debug)]
pub struct RowAllocator {
    /// Free runs, start -> length; never two adjacent ones.
    free: BTreeMap<u32, u32>,
    capacity: u32,
}

impl RowAllocator {
    /// All `capacity` rows free.
    pub fn new(capacity: u32) -> Self {
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        Self { free, capacity }
    }

    /// Rows in all.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Rows in use.
    pub fn used(&self) -> u32 {
        self.capacity - self.free.values().sum::<u32>()
    }

    /// The start of a run of `len` rows, now taken; `None` when no free run is that long.
    ///
    /// ```
    /// use router::unwind_tables::RowAllocator;
    /// let mut rows = RowAllocator::new(10);
    /// let a = rows.allocate(4).unwrap();
    /// let b = rows.allocate(6).unwrap();
    /// assert_eq!(rows.allocate(1), None);
    /// rows.release(a, 4);
    /// rows.release(b, 6);
    /// assert_eq!(rows.allocate(10), Some(0));
    /// ```
    pub fn allocate(&mut self, len: u32) -> Option<u32> {
        let (&start, &run) = self.free.iter().find(|(_, &run)| run >= len)?;
        self.free.remove(&start);
        if run > len {
            self.free.insert(start + len, run - len);
        }
        Some(start)
    }

    /// Gives back the run at `start` of `len` rows.
    pub fn release(&mut self, start: u32, len: u32) {
        let mut start = start;
        let mut len = len;
        if let Some((&before, &before_len)) = self.free.range(..start).next_back() {
            if before + before_len == start {
                self.free.remove(&before);
                start = before;
                len += before_len;
            }
        }
        if let Some(after_len) = self.free.remove(&(start + len)) {
            len += after_len;
        }
        self.free.insert(start, len);
    }
}

#[cfg(test)]
mod tests {
    use super::RowAllocator;

    #[test]
    fn freed_runs_merge_with_both_neighbours_and_are_reused() {
        let mut rows = RowAllocator::new(100);
        let a = rows.allocate(30).unwrap();
        let b = rows.allocate(30).unwrap();
        let c = rows.allocate(30).unwrap();
        assert_eq!(rows.used(), 90);
        assert_eq!(rows.allocate(20), None);
        rows.release(a, 30);
        rows.release(c, 30);
        assert_eq!(rows.allocate(40), Some(c));
        rows.release(c, 40);
        rows.release(b, 30);
        assert_eq!(rows.used(), 0);
        assert_eq!(rows.allocate(100), Some(0));
    }
}
