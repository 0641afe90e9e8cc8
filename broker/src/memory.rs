//! Giving the system back the memory the allocator holds free.
//!
//! glibc's malloc returns freed memory to the system only from the top of each arena, so pages
//! freed below a live allocation stay resident. Every burst (a backlog of outboxes while the
//! machine stalls, a wave of reconnects) then leaves the resident size at its new high-water
//! mark: under churn it creeps up step by step although the live heap is flat (see the soak in
//! docs/BENCHMARKS.md). [`release_free_memory`], called periodically by the server, hands those
//! pages back (`malloc_trim`). This module owns only that call; other allocators and platforms
//! return memory themselves, and there it does nothing.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// How often the server releases free memory: often enough that a burst's pages do not stay
/// resident for long, seldom enough that re-touching them costs nothing measurable.
pub(crate) const RELEASE_INTERVAL: Duration = Duration::from_secs(10);

/// Calls [`release_free_memory`] every [`RELEASE_INTERVAL`] until `shutdown`.
pub(crate) async fn release_periodically(shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(RELEASE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let started = Instant::now();
        let released = release_free_memory();
        tracing::debug!(
            released,
            took_us = started.elapsed().as_micros() as u64,
            "malloc_trim"
        );
    }
}

/// Returns the whole free pages of every malloc arena to the system (glibc's `malloc_trim(0)`,
/// which locks one arena at a time); live allocations are untouched. Returns whether any
/// memory was released. Elsewhere than on glibc it does nothing and returns false.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub(crate) fn release_free_memory() -> bool {
    // SAFETY: `malloc_trim` takes no pointer and keeps no reference; glibc serializes it with
    // every other allocator call through the arena locks.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Returns the whole free pages of every malloc arena to the system (glibc only; here it does
/// nothing and returns false).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn release_free_memory() -> bool {
    false
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// This process's resident set, in bytes (`VmRSS` of /proc/self/status).
    fn resident_bytes() -> usize {
        let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
        let kib: usize = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/self/status");
        kib * 1024
    }

    #[test]
    fn memory_freed_between_live_allocations_goes_back_to_the_system() {
        // 64 MiB in blocks below the mmap threshold, each followed by a small allocation that
        // stays live: the freed blocks cannot merge into the top of their arena, so malloc
        // keeps their pages resident on its own.
        const BLOCK: usize = 64 << 10;
        const BLOCKS: usize = 1024;
        let mut blocks = Vec::with_capacity(BLOCKS);
        let mut keep = Vec::with_capacity(BLOCKS);
        for _ in 0..BLOCKS {
            blocks.push(vec![1u8; BLOCK]);
            keep.push(vec![1u8; 16]);
        }
        drop(blocks);
        let before = resident_bytes();
        assert!(release_free_memory(), "nothing was released");
        let after = resident_bytes();
        assert!(
            before.saturating_sub(after) >= 32 << 20,
            "resident {before} B before, {after} B after"
        );
        drop(keep);
    }
}
