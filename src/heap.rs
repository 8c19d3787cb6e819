//! The bytes the node's heap holds, for the soak's diagnostic build.
//!
//! With the `heap-stats` feature the binary's allocator is wrapped in [`Counting`], which keeps
//! a count of the bytes allocated and not yet freed, and `/metrics` reports it as
//! `ssegate_heap_bytes`. Next to RSS it tells memory the node holds (a leak, a cache, a buffer
//! kept at its peak) from memory its allocator keeps after a peak, which RSS alone cannot.
//! Off by default: every allocation and free then pays an atomic add on one shared counter.
//! (A heap profiler such as DHAT sees the same, but slows the node too much to run a soak.)

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes allocated through [`Counting`] and not yet freed.
static IN_USE: AtomicUsize = AtomicUsize::new(0);

/// Bytes allocated and not yet freed; 0 unless the binary's allocator is a [`Counting`].
pub fn in_use() -> usize {
    IN_USE.load(Ordering::Relaxed)
}

/// An allocator that counts the bytes it hands out (see the module's documentation).
pub struct Counting<A>(pub A);

// SAFETY: every call goes to the wrapped allocator unchanged; only the counter is added.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on as it is.
        let p = unsafe { self.0.alloc(layout) };
        if !p.is_null() {
            IN_USE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { self.0.alloc_zeroed(layout) };
        if !p.is_null() {
            IN_USE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { self.0.dealloc(ptr, layout) };
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            IN_USE.fetch_add(new_size, Ordering::Relaxed);
            IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::System;

    /// The count follows allocations, growth and frees through the wrapper.
    #[test]
    fn counts_what_is_held() {
        let counting = Counting(System);
        let before = in_use();
        let layout = Layout::from_size_align(1000, 8).unwrap();
        // SAFETY: a valid layout; the block is freed with the size it has then.
        unsafe {
            let p = counting.alloc(layout);
            assert_eq!(in_use() - before, 1000);
            let p = counting.realloc(p, layout, 3000);
            assert_eq!(in_use() - before, 3000);
            counting.dealloc(p, Layout::from_size_align(3000, 8).unwrap());
        }
        assert_eq!(in_use(), before);
    }
}
