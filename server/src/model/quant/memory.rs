//! The memory a weight's tiles live in: zeroed, aligned to cache lines, and for a large weight
//! (the 262k-row output projection) asked for in 2 MiB transparent huge pages.
//!
//! Why huge pages: the kernels stream tile rows and prefetch the ones ahead, and with 4 KiB pages
//! every few tile rows of a 178 MB matrix are a new page, so the prefetches miss the TLB and
//! wait on page walks (perf put a tenth of a 16-row product's kernel samples on one prefetch).
//! Where the kernel gives no huge pages (they are off, or memory is too fragmented) the pages
//! are plain ones and nothing else changes.

use std::alloc::Layout;
use std::ptr::NonNull;

/// The size and alignment of a transparent huge page on x86-64 and most 64-bit Linux.
const HUGE_PAGE: usize = 2 << 20;

/// Zeroed bytes, freed on drop.
pub(crate) struct TileMemory {
    start: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: the memory is owned, like a Vec<u8>'s.
unsafe impl Send for TileMemory {}
unsafe impl Sync for TileMemory {}

impl TileMemory {
    /// `len` zeroed bytes aligned to 64, or to a huge page (and advised to take huge pages)
    /// when `len` is at least one; `None` when no allocation can be that large.
    pub(crate) fn zeroed(len: usize) -> Option<Self> {
        let align = if len >= HUGE_PAGE { HUGE_PAGE } else { 64 };
        let layout = Layout::from_size_align(len.max(1), align).ok()?;
        // SAFETY: the layout's size is non-zero.
        let start = unsafe { std::alloc::alloc(layout) };
        let Some(start) = NonNull::new(start) else { std::alloc::handle_alloc_error(layout) };
        if align == HUGE_PAGE {
            advise_huge_pages(start.as_ptr(), layout.size());
        }
        // Zeroed only now, after the advice: the first touch is what takes the pages.
        // SAFETY: `start` holds `layout.size()` bytes.
        unsafe { std::ptr::write_bytes(start.as_ptr(), 0, layout.size()) };
        Some(Self { start, len, layout })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: the allocation holds at least `len` initialized bytes while self lives.
        unsafe { std::slice::from_raw_parts(self.start.as_ptr(), self.len()) }
    }

    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, borrowed uniquely.
        unsafe { std::slice::from_raw_parts_mut(self.start.as_ptr(), self.len()) }
    }
}

impl Drop for TileMemory {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.start.as_ptr(), self.layout) };
    }
}

/// A hint: failing it only leaves plain pages.
#[cfg(target_os = "linux")]
fn advise_huge_pages(start: *mut u8, len: usize) {
    // SAFETY: the range is one live allocation; MADV_HUGEPAGE changes no contents.
    let failed = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE) } != 0;
    if failed {
        tracing::debug!(error = %std::io::Error::last_os_error(), "no huge pages for a weight's tiles");
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_start: *mut u8, _len: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_are_zeroed_and_aligned_small_or_large() {
        for len in [0, 64, 4096 + 64, HUGE_PAGE, HUGE_PAGE + 4096] {
            let mut memory = TileMemory::zeroed(len).unwrap();
            assert_eq!(memory.len(), len);
            assert!(memory.bytes().iter().all(|&b| b == 0), "{len}");
            let align = if len >= HUGE_PAGE { HUGE_PAGE } else { 64 };
            assert_eq!(memory.bytes().as_ptr() as usize % align, 0, "{len}");
            if let Some(last) = memory.bytes_mut().last_mut() {
                *last = 7;
                assert_eq!(memory.bytes()[len - 1], 7);
            }
        }
    }

    /// Where the kernel offers transparent huge pages for advised memory, large tiles get them.
    #[cfg(target_os = "linux")]
    #[test]
    fn large_tiles_take_huge_pages_where_the_kernel_offers_them() {
        let setting = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
        if setting.is_empty() || setting.contains("[never]") {
            eprintln!("transparent huge pages are off here: {setting:?}");
            return;
        }
        let memory = TileMemory::zeroed(4 * HUGE_PAGE).unwrap();
        let start = memory.bytes().as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        // The mapping holding the tiles, then its AnonHugePages line.
        let mut in_mapping = false;
        let mut huge_kib = None;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ').filter(|(range, _)| range.contains('-') && !range.contains(':')) {
                let (from, to) = range.split_once('-').unwrap();
                let (from, to) = (usize::from_str_radix(from, 16).unwrap_or(0), usize::from_str_radix(to, 16).unwrap_or(0));
                in_mapping = (from..to).contains(&start);
            } else if in_mapping && line.starts_with("AnonHugePages:") {
                huge_kib = line.split_whitespace().nth(1).and_then(|kib| kib.parse::<usize>().ok());
            }
        }
        let huge_kib = huge_kib.expect("the tiles' mapping is in /proc/self/smaps");
        assert!(huge_kib >= 2048, "{huge_kib} KiB of huge pages under 8 MiB of tiles (THP {setting:?})");
    }
}
