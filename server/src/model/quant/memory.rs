//! The memory weights' tiles live in: zeroed, aligned to cache lines, and in 2 MiB transparent
//! huge pages. A weight of at least a huge page has an allocation of its own; smaller ones (a
//! layer's matrices, under a megabyte each for Gemma 3 270M) are carved one after another out of
//! shared slabs, so that they too sit in huge pages.
//!
//! Why huge pages: the kernels stream tile rows and prefetch the ones ahead, and with 4 KiB pages
//! every few tile rows are a new page, so the prefetches miss the TLB and wait on page walks
//! (perf put a tenth of a 16-row product's kernel samples on one prefetch). Where the kernel
//! gives no huge pages (they are off, or memory is too fragmented) the pages are plain ones and
//! nothing else changes.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError};

/// The size and alignment of a transparent huge page on x86-64 and most 64-bit Linux.
const HUGE_PAGE: usize = 2 << 20;
/// The slabs smaller weights are carved from. Only the huge pages a slab's weights reach are
/// ever touched, so what a last, partly used slab costs is at most one huge page.
const SLAB: usize = 16 * HUGE_PAGE;
/// Tiles start on cache lines.
const LINE: usize = 64;

/// One aligned allocation, freed when the last tiles in it go.
struct Allocation {
    start: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the allocation is plain bytes; who may write which of them is `TileMemory`'s business.
unsafe impl Send for Allocation {}
unsafe impl Sync for Allocation {}

impl Allocation {
    /// `size` bytes at a huge page's alignment, advised to take huge pages, not yet touched.
    fn huge(size: usize) -> Option<Self> {
        let layout = Layout::from_size_align(size.max(1), HUGE_PAGE).ok()?;
        // SAFETY: the layout's size is non-zero.
        let start = unsafe { std::alloc::alloc(layout) };
        let Some(start) = NonNull::new(start) else { std::alloc::handle_alloc_error(layout) };
        advise_huge_pages(start.as_ptr(), layout.size());
        Some(Self { start, layout })
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        // SAFETY: allocated in `huge` with this layout.
        unsafe { std::alloc::dealloc(self.start.as_ptr(), self.layout) };
    }
}

/// One weight's zeroed tile bytes: `len` bytes from `offset` of an allocation no other
/// `TileMemory` overlaps.
pub(crate) struct TileMemory {
    allocation: Arc<Allocation>,
    offset: usize,
    len: usize,
}

impl TileMemory {
    /// Zeroes the range: the first touch, after the advice, is what takes the huge pages.
    fn zeroed(allocation: Arc<Allocation>, offset: usize, len: usize) -> Self {
        debug_assert!(offset + len <= allocation.layout.size());
        let mut memory = Self { allocation, offset, len };
        memory.bytes_mut().fill(0);
        memory
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: the range lies within the allocation, which lives as long as self.
        unsafe { std::slice::from_raw_parts(self.allocation.start.as_ptr().add(self.offset), self.len) }
    }

    /// The bytes as words, for code that streams them (the start is cache-line aligned).
    pub(crate) fn words(&self) -> &[u64] {
        // SAFETY: any bytes are a valid u64; the allocation starts on a huge page and `offset`
        // on a cache line, so the words are aligned, and `len / 8` of them lie in the range.
        unsafe { std::slice::from_raw_parts(self.bytes().as_ptr().cast::<u64>(), self.len / 8) }
    }

    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; no other TileMemory overlaps this range, and self is borrowed
        // uniquely.
        unsafe { std::slice::from_raw_parts_mut(self.allocation.start.as_ptr().add(self.offset), self.len) }
    }
}

/// Hands out the tiles of one model's weights (see the module documentation).
#[derive(Default)]
pub struct TileArena {
    /// The slab being carved, and how much of it is taken.
    open: Mutex<Option<(Arc<Allocation>, usize)>>,
}

impl TileArena {
    /// `len` zeroed bytes, starting on a cache line; `None` when no allocation can be that large.
    pub(crate) fn tiles(&self, len: usize) -> Option<TileMemory> {
        if len >= HUGE_PAGE {
            return Some(TileMemory::zeroed(Arc::new(Allocation::huge(len)?), 0, len));
        }
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let fits = |(_, used): &(Arc<Allocation>, usize)| used.next_multiple_of(LINE) + len <= SLAB;
        if !open.as_ref().is_some_and(fits) {
            *open = Some((Arc::new(Allocation::huge(SLAB)?), 0));
        }
        let (slab, used) = open.as_mut()?;
        let offset = used.next_multiple_of(LINE);
        *used = offset + len;
        Some(TileMemory::zeroed(slab.clone(), offset, len))
    }
}

/// A hint: failing it only leaves plain pages.
#[cfg(target_os = "linux")]
fn advise_huge_pages(start: *mut u8, len: usize) {
    // SAFETY: the range is one live allocation; MADV_HUGEPAGE changes no contents.
    let failed = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE) } != 0;
    if failed {
        tracing::debug!(error = %std::io::Error::last_os_error(), "no huge pages for weights' tiles");
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_start: *mut u8, _len: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_are_zeroed_aligned_and_apart_small_or_large() -> Result<(), &'static str> {
        let arena = TileArena::default();
        // Sixteen of the weights just under a huge page fill a slab; the seventeenth opens another.
        let mut sizes = vec![0, 64, 4096 + 64, 100, HUGE_PAGE, HUGE_PAGE + 4096, 7];
        sizes.extend([HUGE_PAGE - 1; 17]);
        let mut tiles: Vec<TileMemory> = sizes.iter().map(|&len| arena.tiles(len).ok_or("no memory for tiles")).collect::<Result<_, _>>()?;
        for (i, memory) in tiles.iter_mut().enumerate() {
            assert_eq!(memory.len(), sizes[i]);
            assert!(memory.bytes().iter().all(|&b| b == 0), "{}", sizes[i]);
            let align = if sizes[i] >= HUGE_PAGE { HUGE_PAGE } else { LINE };
            assert_eq!(memory.bytes().as_ptr() as usize % align, 0, "{}", sizes[i]);
            memory.bytes_mut().fill(i as u8 + 1);
        }
        // Each weight's bytes are its own: none was overwritten by another's.
        for (i, memory) in tiles.iter().enumerate() {
            assert!(memory.bytes().iter().all(|&b| b == i as u8 + 1), "{}", sizes[i]);
        }
        let slabs: std::collections::HashSet<usize> = tiles.iter().filter(|t| t.len < HUGE_PAGE).map(|t| t.allocation.start.as_ptr() as usize).collect();
        assert_eq!(slabs.len(), 2);
        Ok(())
    }

    /// Where the kernel offers transparent huge pages for advised memory, small weights carved
    /// from a slab get them too.
    #[cfg(target_os = "linux")]
    #[test]
    fn tiles_take_huge_pages_where_the_kernel_offers_them() -> Result<(), &'static str> {
        let setting = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
        if setting.is_empty() || setting.contains("[never]") {
            eprintln!("transparent huge pages are off here: {setting:?}");
            return Ok(());
        }
        let arena = TileArena::default();
        let small: Vec<TileMemory> = (0..12).map(|_| arena.tiles(HUGE_PAGE / 3).ok_or("no memory for tiles")).collect::<Result<_, _>>()?;
        let start = small[0].bytes().as_ptr() as usize;
        let huge_kib = anon_huge_kib_of_mapping(start).ok_or("the tiles' mapping is not in /proc/self/smaps")?;
        assert!(huge_kib >= 2048, "{huge_kib} KiB of huge pages under 8 MiB of small tiles (THP {setting:?})");
        Ok(())
    }

    /// The AnonHugePages of the mapping holding `address`, from /proc/self/smaps.
    #[cfg(target_os = "linux")]
    fn anon_huge_kib_of_mapping(address: usize) -> Option<usize> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut in_mapping = false;
        for line in smaps.lines() {
            let range = line.split_once(' ').map(|(range, _)| range).filter(|range| range.contains('-') && !range.contains(':'));
            if let Some((from, to)) = range.and_then(|range| range.split_once('-')) {
                let (from, to) = (usize::from_str_radix(from, 16).ok()?, usize::from_str_radix(to, 16).ok()?);
                in_mapping = (from..to).contains(&address);
            } else if in_mapping && line.starts_with("AnonHugePages:") {
                return line.split_whitespace().nth(1)?.parse().ok();
            }
        }
        None
    }
}
