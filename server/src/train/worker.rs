//! The trainer: a thread that claims queued jobs from the store and runs them one at a time on
//! a thread pool of its own, at lower priority than serving. Every server that trains runs one;
//! the store's claims make each job run on exactly one of them, and a claim whose trainer died
//! expires and is taken over, resuming from the job's last checkpoint.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Weak};
use std::time::Duration;

use crate::store::{Claim, Store, CLAIM_LEASE_SECS};
use crate::train::job::Tuner;

/// How often an idle trainer looks for a job it was not woken for (queued on another server,
/// or left by a trainer that died).
const CLAIM_POLL: Duration = Duration::from_secs(1);

/// Starts the trainer thread. It ends when the tuner is dropped.
pub fn start(tuner: Weak<Tuner>, woken: mpsc::Receiver<()>, threads: usize) -> std::io::Result<()> {
    std::thread::Builder::new().name("tessera-trainer".into()).spawn(move || {
        let pool = match rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("tessera-train-{i}"))
            .start_handler(|_| lower_priority())
            .build()
        {
            Ok(pool) => pool,
            Err(e) => return tracing::error!(error = %e, "trainer thread pool not started"),
        };
        lower_priority();
        while !matches!(woken.recv_timeout(CLAIM_POLL), Err(mpsc::RecvTimeoutError::Disconnected)) {
            let Some(tuner) = tuner.upgrade() else { return };
            loop {
                match tuner.store.claim_job(tuner.trainer()) {
                    Ok(Some(claim)) => {
                        tracing::info!(job = %claim.job, trainer = %claim.trainer, "fine-tuning job claimed");
                        pool.install(|| tuner.run_claimed(&claim));
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "no job claimed: the store did not answer");
                        break;
                    }
                }
            }
        }
    })?;
    Ok(())
}

/// Renews a claim while its job runs; raises `stop` once the claim is lost. Dropping it stops
/// the renewals.
pub struct Heartbeat {
    _stop_renewing: mpsc::Sender<()>,
}

impl Heartbeat {
    pub fn start(store: Arc<Store>, claim: Claim, stop: Arc<AtomicBool>) -> Self {
        let (sender, receiver) = mpsc::channel::<()>();
        let every = Duration::from_secs((CLAIM_LEASE_SECS / 3).max(1) as u64);
        let renewing = move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = receiver.recv_timeout(every) {
                match store.renew_claim(&claim) {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::info!(job = %claim.job, "the job's claim ended (cancelled, or taken over): stopping it");
                        stop.store(true, Ordering::SeqCst);
                        return;
                    }
                    // A database that does not answer for a while is not a lost claim: the
                    // lease tells, once the database is back.
                    Err(e) => tracing::warn!(job = %claim.job, error = %e, "job claim not renewed"),
                }
            }
        };
        if let Err(e) = std::thread::Builder::new().name("tessera-heartbeat".into()).spawn(renewing) {
            tracing::error!(error = %e, "job heartbeat not started: the claim will expire");
        }
        Self { _stop_renewing: sender }
    }
}

/// Training threads yield to serving: the lowest CPU priority (nice 19) for the calling thread.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority on the calling thread's own id has no memory effects.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
    }
}
