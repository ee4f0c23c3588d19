//! File formats, one module each. None of them knows about the CLI.

pub mod gguf;
pub mod hf_config;
pub mod safetensors;

/// `MADV_DONTNEED` on `len` bytes at `start` of a read-only file map (rounded out to whole pages
/// by memmap2): resident memory does not grow with a model streamed through the map. A range
/// outside the map is ignored.
pub(crate) fn release_pages(map: &memmap2::Mmap, start: usize, len: usize) {
    if len > 0 && start.checked_add(len).is_some_and(|end| end <= map.len()) {
        // SAFETY: a read-only private mapping of a file: dropped pages are read from the file
        // again if touched, so no data can be lost.
        let _ =
            unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len) };
    }
}

/// [`release_pages`] for a `start..end` byte range given in file offsets.
pub(crate) fn release_range(map: &memmap2::Mmap, start: u64, end: u64) {
    if let (Ok(start), Ok(end)) = (usize::try_from(start), usize::try_from(end)) {
        release_pages(map, start, end.saturating_sub(start));
    }
}
