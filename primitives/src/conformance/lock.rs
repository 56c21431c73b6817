//! The fencing-token lock on every backend.

use super::*;

pub(super) fn cases() -> Vec<Case> {
    vec![
        case!(lock_mutual_exclusion_under_contention),
        case!(lock_expiry_lets_the_next_holder_in),
        case!(lock_stale_holder_cannot_release_or_extend),
        case!(lock_fencing_tokens_increase_across_holders_and_expiry),
        case!(lock_fence_check_rejects_a_late_write),
        case!(lock_auto_renew_keeps_the_lease_and_reports_loss),
        case!(lock_with_lock_releases_on_success_error_and_cancel),
        case!(lock_acquire_waits_with_a_bound),
        case!(lock_cancelled_acquisition_leaves_no_hold),
        case!(lock_with_lock_reports_a_lease_lost_while_the_body_ran),
        case!(lock_ttl_shorter_than_the_acquisition_reports_the_cause),
        case!(lock_deadline_keeps_a_drift_margin),
        case!(lock_fence_rejects_an_equal_token_from_another_owner),
        case!(lock_release_wakes_waiters_in_this_process),
    ]
}

// ----- lock -----------------------------------------------------------------------------------
//
// The lock and rate-limit cases run the primitives on the backend under test, inside the case's
// own prefix (through `Namespaced`), so they check that the contract is enough to build them.

use crate::lock::{Fence, FenceCheck, Lock, LockError, LockOptions, OWNER_TOKEN_BYTES, Renewal};

async fn lock_mutual_exclusion_under_contention(c: Ctx) {
    const LOCK_TASKS: usize = 16;
    const ROUNDS: usize = 8;
    let options = LockOptions::default()
        .wait(Duration::from_secs(60))
        .retry_backoff(ms(1), ms(20));
    let lock = Lock::with_options(confined(&c), options);
    let holders = Arc::new(AtomicU64::new(0));
    let tokens = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for _ in 0..LOCK_TASKS {
        let (lock, holders, tokens) = (lock.clone(), Arc::clone(&holders), Arc::clone(&tokens));
        handles.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let lease = lock
                    .acquire("shared", Duration::from_secs(30))
                    .await
                    .unwrap();
                let before = holders.fetch_add(1, Ordering::SeqCst);
                assert_eq!(before, 0, "two holders inside the critical section at once");
                tokens.lock().unwrap().push(lease.fencing_token());
                tokio::task::yield_now().await;
                holders.fetch_sub(1, Ordering::SeqCst);
                assert!(lease.release().await.unwrap(), "a live lease releases");
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let tokens = tokens.lock().unwrap().clone();
    assert_eq!(tokens.len(), LOCK_TASKS * ROUNDS);
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "fencing tokens must increase in holding order: {tokens:?}"
    );
}

async fn lock_expiry_lets_the_next_holder_in(c: Ctx) {
    let b = confined(&c);
    let lock = Lock::new(Arc::clone(&b));
    let ttl = ms(1000);
    let first = lock
        .try_acquire("job", ttl)
        .await
        .unwrap()
        .expect("a free lock");
    assert!(!first.is_lost());
    assert!(first.remaining() <= ttl);
    assert!(
        lock.try_acquire("job", ttl).await.unwrap().is_none(),
        "held until the TTL passes"
    );
    let_expire(ttl).await;
    assert!(first.is_lost(), "the local deadline passed too");
    let second = lock
        .try_acquire("job", Duration::from_secs(30))
        .await
        .unwrap()
        .expect("an expired lock is free");
    assert!(second.fencing_token() > first.fencing_token());
    assert!(second.release().await.unwrap());
}

async fn lock_stale_holder_cannot_release_or_extend(c: Ctx) {
    let b = confined(&c);
    let lock = Lock::new(Arc::clone(&b));
    let stale = lock.try_acquire("job", ms(1000)).await.unwrap().unwrap();
    let_expire(ms(1000)).await;
    let current = lock
        .try_acquire("job", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    match stale.extend(Duration::from_secs(30)).await {
        Err(LockError::Lost { .. }) => {}
        other => panic!("extending an expired lease must fail with Lost, got {other:?}"),
    }
    assert!(
        !stale.release().await.unwrap(),
        "releasing a lost lease reports false"
    );
    let stored = b
        .get(b"lock:{job}")
        .await
        .unwrap()
        .expect("the new holder's key survives");
    assert_eq!(stored[..OWNER_TOKEN_BYTES], current.owner_token());
    assert_eq!(
        stored[OWNER_TOKEN_BYTES..],
        current.fencing_token().to_le_bytes()
    );
    match b.ttl(b"lock:{job}").await.unwrap() {
        Ttl::Remaining(d) => assert!(d > Duration::from_secs(20), "TTL disturbed: {d:?}"),
        other => panic!("the new holder's TTL is gone: {other:?}"),
    }
    current.extend(Duration::from_secs(60)).await.unwrap();
    assert!(current.remaining() > Duration::from_secs(50));
    match b.ttl(b"lock:{job}").await.unwrap() {
        Ttl::Remaining(d) => assert!(d > Duration::from_secs(50), "extend did not extend: {d:?}"),
        other => panic!("extend lost the TTL: {other:?}"),
    }
    assert!(current.release().await.unwrap());
    assert_eq!(b.get(b"lock:{job}").await.unwrap(), None);
    // Expired with nobody else holding it: extend still fails, and says so.
    let lapsed = lock.try_acquire("alone", ms(1000)).await.unwrap().unwrap();
    let_expire(ms(1000)).await;
    assert!(matches!(
        lapsed.extend(Duration::from_secs(30)).await,
        Err(LockError::Lost { .. })
    ));
    assert!(lapsed.is_lost());
    assert!(!lapsed.release().await.unwrap());
}

async fn lock_fencing_tokens_increase_across_holders_and_expiry(c: Ctx) {
    let b = confined(&c);
    // Two "nodes" sharing the backend.
    let nodes = [Lock::new(Arc::clone(&b)), Lock::new(Arc::clone(&b))];
    let mut last = 0;
    for i in 0..6 {
        // Holders that lose the lock by expiry get a short TTL (long enough for an acquisition
        // on a loaded machine); the others a long one, so they are still holders when they
        // release.
        let expires = i % 3 == 0;
        let ttl = if expires {
            ms(1000)
        } else {
            Duration::from_secs(30)
        };
        let lease = nodes[i % 2]
            .try_acquire("fenced", ttl)
            .await
            .unwrap()
            .expect("free");
        assert!(
            lease.fencing_token() > last,
            "token {} after {last}",
            lease.fencing_token()
        );
        last = lease.fencing_token();
        if expires {
            let_expire(ttl).await; // this holder loses it by expiry
            assert!(!lease.release().await.unwrap());
        } else {
            assert!(lease.release().await.unwrap());
        }
    }
    assert_eq!(
        b.ttl(&crate::lock::fence_counter_key(b"fenced"))
            .await
            .unwrap(),
        Ttl::NoExpiry,
        "the fencing counter must never expire"
    );
    let other = nodes[0]
        .try_acquire("another", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert_ne!(
        crate::lock::fence_counter_key(b"another"),
        crate::lock::fence_counter_key(b"fenced")
    );
    assert_eq!(
        other.fencing_token(),
        1,
        "a name on another stripe has its own sequence"
    );
}

async fn lock_fence_check_rejects_a_late_write(c: Ctx) {
    let b = confined(&c);
    let lock = Lock::new(Arc::clone(&b));
    let fence = Fence::new(Arc::clone(&b));
    let stale = lock
        .try_acquire("ledger-lock", ms(1000))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        fence
            .check_and_record("ledger", stale.fencing_token())
            .await
            .unwrap(),
        FenceCheck::Accepted
    );
    let_expire(ms(1000)).await;
    let current = lock
        .try_acquire("ledger-lock", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert!(
        fence
            .check_and_record("ledger", current.fencing_token())
            .await
            .unwrap()
            .is_accepted()
    );
    // The stalled first holder wakes up and tries to write: refused.
    assert_eq!(
        fence
            .check_and_record("ledger", stale.fencing_token())
            .await
            .unwrap(),
        FenceCheck::Rejected {
            highest: current.fencing_token()
        }
    );
    assert!(
        fence
            .check_and_record("ledger", current.fencing_token())
            .await
            .unwrap()
            .is_accepted(),
        "the current holder may write again"
    );
    assert_eq!(
        fence.highest("ledger").await.unwrap(),
        Some(current.fencing_token())
    );
    assert_eq!(fence.highest("untouched").await.unwrap(), None);
    // Concurrent writers with tokens 1..=16: the record ends at the highest, and a writer is
    // rejected only in favour of a higher token.
    let mut handles = Vec::new();
    for token in 1..=16u64 {
        let fence = fence.clone();
        handles.push(tokio::spawn(async move {
            (token, fence.check_and_record("race", token).await.unwrap())
        }));
    }
    for h in handles {
        let (token, check) = h.await.unwrap();
        if let FenceCheck::Rejected { highest } = check {
            assert!(highest > token, "token {token} rejected by {highest}");
        }
    }
    assert_eq!(fence.highest("race").await.unwrap(), Some(16));
}

async fn lock_auto_renew_keeps_the_lease_and_reports_loss(c: Ctx) {
    let b = confined(&c);
    let renewing = Lock::with_options(
        Arc::clone(&b),
        LockOptions::default().renewal(Renewal::Auto),
    );
    let other = Lock::new(Arc::clone(&b));
    let lease = renewing
        .try_acquire("renewed", ms(1000))
        .await
        .unwrap()
        .unwrap();
    // Several TTLs of real time: only the renewals keep it.
    tokio::time::sleep(ms(3000)).await;
    assert!(!lease.is_lost(), "auto-renew let the lease lapse");
    assert!(
        other
            .try_acquire("renewed", ms(300))
            .await
            .unwrap()
            .is_none(),
        "still held"
    );
    // The key disappears behind the holder's back (an operator, a failover) and someone else
    // takes the lock: the next renewal finds out and reports the loss.
    assert!(b.delete(b"lock:{renewed}").await.unwrap());
    let thief = other
        .try_acquire("renewed", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), lease.lost())
        .await
        .expect("the loss was not reported");
    assert!(lease.is_lost());
    assert!(lease.watch().is_lost());
    assert!(matches!(
        lease.extend(ms(300)).await,
        Err(LockError::Lost { .. })
    ));
    assert!(!lease.release().await.unwrap());
    let stored = b
        .get(b"lock:{renewed}")
        .await
        .unwrap()
        .expect("the new holder keeps the lock");
    assert_eq!(stored[..OWNER_TOKEN_BYTES], thief.owner_token());
    assert!(thief.release().await.unwrap());
}

async fn lock_with_lock_releases_on_success_error_and_cancel(c: Ctx) {
    let b = confined(&c);
    let lock = Lock::new(Arc::clone(&b));
    let ttl = Duration::from_secs(30);
    let seen = {
        let b = Arc::clone(&b);
        lock.with_lock("scoped", ttl, |lease| async move {
            assert!(!lease.is_lost());
            assert!(
                b.get(b"lock:{scoped}").await.unwrap().is_some(),
                "held while running"
            );
            lease.fencing_token()
        })
        .await
        .unwrap()
    };
    assert_eq!(seen, 1);
    assert_eq!(
        b.get(b"lock:{scoped}").await.unwrap(),
        None,
        "released after success"
    );

    let failed: Result<(), &str> = lock
        .with_lock("scoped", ttl, |_| async { Err("boom") })
        .await
        .unwrap();
    assert_eq!(failed, Err("boom"));
    assert_eq!(
        b.get(b"lock:{scoped}").await.unwrap(),
        None,
        "released after an error"
    );

    // Release on panic is the same release; `lock`'s unit tests cover it without printing a
    // panic into this matrix.

    // Dropped while the body runs: the lease's drop releases it in the background.
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let mut running = Box::pin(lock.with_lock("scoped", ttl, move |_| async move {
        let _ = started_tx.send(());
        std::future::pending::<()>().await
    }));
    tokio::select! {
        _ = &mut running => panic!("the body never finishes"),
        started = started_rx => started.unwrap(),
    }
    drop(running);
    let next = lock
        .acquire_within("scoped", ttl, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        next.fencing_token(),
        4,
        "tokens 1-3 went to the three scoped runs"
    );
    assert!(next.release().await.unwrap());
}

async fn lock_acquire_waits_with_a_bound(c: Ctx) {
    let b = confined(&c);
    let lock = Lock::with_options(
        Arc::clone(&b),
        LockOptions::default().retry_backoff(ms(5), ms(50)),
    );
    let ttl = Duration::from_secs(30);
    let held = lock.try_acquire("busy", ttl).await.unwrap().unwrap();
    match lock.acquire_within("busy", ttl, ms(300)).await {
        Err(LockError::Timeout { waited, .. }) => {
            assert!(waited >= ms(300), "gave up early: {waited:?}")
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    let (waiting_tx, waiting_rx) = tokio::sync::oneshot::channel();
    let waiter = {
        let lock = lock.clone();
        tokio::spawn(async move {
            let _ = waiting_tx.send(());
            let lease = lock
                .acquire_within("busy", ttl, Duration::from_secs(30))
                .await
                .unwrap();
            let token = lease.fencing_token();
            assert!(lease.release().await.unwrap());
            token
        })
    };
    waiting_rx.await.unwrap();
    let held_token = held.fencing_token();
    assert!(held.release().await.unwrap());
    assert!(
        waiter.await.unwrap() > held_token,
        "the waiter got in after the release"
    );
}

/// Waits (bounded) until `key` is gone on `b`; the cleanup it waits for runs in the background.
async fn until_absent(b: &dyn Backend, key: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.get(key).await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "{:?} is still held 10 s after the acquisition was cancelled",
            String::from_utf8_lossy(key)
        );
        tokio::time::sleep(ms(5)).await;
    }
}

/// An acquisition dropped at each of its await points (each of its three writes, before the
/// write and after it took effect) leaves no hold: the next acquisition succeeds at once.
async fn lock_cancelled_acquisition_leaves_no_hold(c: Ctx) {
    use super::cancel_point::{CancelPoint, Stop};
    let b = confined(&c);
    for at in 1..=3 {
        for stop in [Stop::Before, Stop::After] {
            let point = Arc::new(CancelPoint::new(Arc::clone(&b), at, stop));
            let reached = Arc::clone(&point.reached);
            let lock = Lock::new(point);
            let attempt = lock.try_acquire("cancel", Duration::from_secs(60));
            tokio::select! {
                outcome = attempt => panic!("write {at} ({stop:?}) was not stopped: {outcome:?}"),
                () = reached.notified() => {} // dropping `attempt` here is the cancellation
            }
            until_absent(&*b, b"lock:{cancel}").await;
            let lease = Lock::new(Arc::clone(&b))
                .try_acquire("cancel", Duration::from_secs(60))
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("write {at} ({stop:?}): the lock is still held"));
            assert!(lease.release().await.unwrap());
        }
    }
}

/// `with_lock` does not return the body's output as if nothing happened when the lease was
/// lost while the body ran; `with_lock_or_cancel` also stops the body.
async fn lock_with_lock_reports_a_lease_lost_while_the_body_ran(c: Ctx) {
    let b = confined(&c);
    let lock = Lock::new(Arc::clone(&b));
    let ttl = ms(600);
    // Someone else's hand (or an expiry) removes the hold while the body runs; auto-renew
    // finds out at its next renewal.
    let stolen = Arc::clone(&b);
    let outcome = lock
        .with_lock("lost", ttl, |lease| async move {
            assert!(stolen.delete(b"lock:{lost}").await.unwrap());
            lease.lost().await;
            42
        })
        .await;
    assert!(
        matches!(outcome, Err(LockError::Lost { .. })),
        "{outcome:?}"
    );

    let stolen = Arc::clone(&b);
    let outcome = lock
        .with_lock_or_cancel("lost", ttl, |_| async move {
            assert!(stolen.delete(b"lock:{lost}").await.unwrap());
            std::future::pending::<u32>().await // only the loss ends this body
        })
        .await;
    assert!(
        matches!(outcome, Err(LockError::Lost { .. })),
        "{outcome:?}"
    );
    // A body that finishes with the lease intact gets its output.
    assert_eq!(
        lock.with_lock("lost", ttl, |_| async { 7 }).await.unwrap(),
        7
    );
}

/// A TTL that runs out during the acquisition's own round trips is reported as such, not as
/// "held by another owner". The fencing write is held back until the pending hold's TTL has
/// passed on the backend's clock (a real TTL elapsing, the only sleep here).
async fn lock_ttl_shorter_than_the_acquisition_reports_the_cause(c: Ctx) {
    use super::cancel_point::{CancelPoint, Stop};
    let b = confined(&c);
    // The acquisition's second write is the fencing `incr_durable`; hold it back 450 ms, far
    // past the 50 ms TTL on any server's clock.
    let slow = CancelPoint::new(Arc::clone(&b), 2, Stop::Delay(ms(450)));
    let lock = Lock::new(Arc::new(slow));
    let err = lock
        .try_acquire("short", ms(50))
        .await
        .expect_err("the TTL expired before the confirmation");
    assert!(matches!(err, LockError::TtlTooShort { .. }), "{err:?}");
    assert!(err.to_string().contains("TTL"), "{err}");
    assert_eq!(
        b.get(b"lock:{short}").await.unwrap(),
        None,
        "nothing is held"
    );
}

/// The local deadline leaves the drift margin (1% + 2 ms) before the server's TTL ends.
async fn lock_deadline_keeps_a_drift_margin(c: Ctx) {
    let lock = Lock::new(confined(&c));
    let ttl = Duration::from_secs(10);
    let before = std::time::Instant::now();
    let lease = lock.try_acquire("drift", ttl).await.unwrap().unwrap();
    let after = std::time::Instant::now();
    let margin = crate::lock::drift_margin(ttl);
    assert_eq!(margin, ms(102));
    // Measured from a start between `before` and `after`, minus the margin.
    assert!(lease.deadline() >= before + ttl - margin);
    assert!(lease.deadline() <= after + ttl - margin);
    assert!(lease.release().await.unwrap());
}

/// Two holders handed the same token (what a fencing counter rolled back by a crash or a
/// failover would do): with owners recorded, the second cannot write. Retention gives the
/// record a TTL.
async fn lock_fence_rejects_an_equal_token_from_another_owner(c: Ctx) {
    let b = confined(&c);
    let fence = Fence::new(Arc::clone(&b));
    let (first, second) = ([1u8; OWNER_TOKEN_BYTES], [2u8; OWNER_TOKEN_BYTES]);
    let check = |token, owner: [u8; OWNER_TOKEN_BYTES]| {
        let fence = fence.clone();
        async move {
            fence
                .check_and_record_owned("ledger", token, &owner)
                .await
                .unwrap()
        }
    };
    assert_eq!(check(7, first).await, FenceCheck::Accepted);
    assert_eq!(
        check(7, first).await,
        FenceCheck::Accepted,
        "the same holder again"
    );
    assert_eq!(check(7, second).await, FenceCheck::Rejected { highest: 7 });
    assert_eq!(check(6, first).await, FenceCheck::Rejected { highest: 7 });
    assert_eq!(check(8, second).await, FenceCheck::Accepted);
    assert_eq!(fence.highest("ledger").await.unwrap(), Some(8));
    // A record written without an owner learns the first owner that presents its token.
    assert!(
        fence
            .check_and_record("plain", 3)
            .await
            .unwrap()
            .is_accepted()
    );
    assert_eq!(check_plain(&fence, 3, first).await, FenceCheck::Accepted);
    assert_eq!(
        check_plain(&fence, 3, second).await,
        FenceCheck::Rejected { highest: 3 }
    );
    assert_eq!(b.ttl(b"fence:ledger").await.unwrap(), Ttl::NoExpiry);
    let kept = Fence::new(Arc::clone(&b)).with_retention(Duration::from_secs(3600));
    assert!(
        kept.check_and_record("short", 1)
            .await
            .unwrap()
            .is_accepted()
    );
    match b.ttl(b"fence:short").await.unwrap() {
        Ttl::Remaining(d) => assert!(d <= Duration::from_secs(3600) && d > ms(3_500_000)),
        other => panic!("a retained record has a TTL: {other:?}"),
    }
}

async fn check_plain(fence: &Fence, token: u64, owner: [u8; OWNER_TOKEN_BYTES]) -> FenceCheck {
    fence
        .check_and_record_owned("plain", token, &owner)
        .await
        .unwrap()
}

/// A waiter polling slowly (its next poll is seconds away) takes the lock as soon as the
/// holder in the same process releases it: the release wakes it.
async fn lock_release_wakes_waiters_in_this_process(c: Ctx) {
    let b = confined(&c);
    let options = LockOptions::default()
        .wait(Duration::from_secs(30))
        .retry_backoff(Duration::from_secs(20), Duration::from_secs(20));
    let lock = Lock::with_options(Arc::clone(&b), options);
    for round in 0..3 {
        let held = lock
            .try_acquire("woken", Duration::from_secs(30))
            .await
            .unwrap()
            .expect("free");
        let waiter = {
            let lock = lock.clone();
            tokio::spawn(async move {
                let lease = lock.acquire("woken", Duration::from_secs(30)).await?;
                let token = lease.fencing_token();
                lease.release().await?;
                Ok::<u64, LockError>(token)
            })
        };
        // Let the waiter fail its first attempt and settle into its 10 to 20 s wait.
        while crate::lock::parked_waiters(&b, b"woken") == 0 {
            tokio::task::yield_now().await;
        }
        let released_at = Instant::now();
        let first = held.fencing_token();
        if round == 2 {
            drop(held); // a dropped lease wakes waiters too
        } else {
            assert!(held.release().await.unwrap());
        }
        let token = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken well before its next poll")
            .unwrap()
            .unwrap();
        assert!(token > first, "round {round}");
        assert!(released_at.elapsed() < Duration::from_secs(5));
    }
}
