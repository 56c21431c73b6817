//! Dedup on every backend: one winner among concurrent claims, lease expiry, owner-only
//! completion, `once` releasing on error and cancellation, batches, and bad input.

use super::kv::collect_scan;
use super::*;
use crate::dedup::{
    CLAIM_MANY_IDS_MAX, Claim, Dedup, DedupError, DedupOptions, ID_BYTES_MAX, Once,
    RESULT_BYTES_MAX, State,
};

pub(super) fn cases() -> Vec<Case> {
    vec![
        case!(dedup_concurrent_claims_have_one_winner),
        case!(dedup_concurrent_once_runs_the_body_once),
        case!(dedup_claim_of_a_dead_owner_expires_and_can_be_claimed_again),
        case!(dedup_late_completion_after_expiry_is_refused),
        case!(dedup_once_releases_on_error_and_cancel),
        case!(dedup_once_renews_its_lease_while_the_body_runs),
        case!(dedup_done_returns_the_first_result_and_keys_carry_ttls),
        case!(dedup_claim_many_reports_each_id),
        case!(dedup_bad_input_is_typed_and_writes_nothing),
    ]
}

const CLAIMERS: usize = 32;

/// Every key under `prefix`, once each (a scan may repeat keys on Redis).
pub(super) async fn scan_all(b: &dyn Backend, prefix: &[u8]) -> Vec<Vec<u8>> {
    let mut keys = collect_scan(b, prefix, 100).await;
    keys.sort();
    keys.dedup();
    keys
}
const LONG: Duration = Duration::from_secs(60);

async fn dedup_concurrent_claims_have_one_winner(c: Ctx) {
    let dedup = Dedup::new(confined(&c));
    let barrier = Arc::new(tokio::sync::Barrier::new(CLAIMERS));
    let mut handles = Vec::new();
    for _ in 0..CLAIMERS {
        let (dedup, barrier) = (dedup.clone(), Arc::clone(&barrier));
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            dedup.claim("evt-1", LONG).await.unwrap()
        }));
    }
    let mut tickets = Vec::new();
    let mut in_progress = 0;
    for h in handles {
        match h.await.unwrap() {
            Claim::Claimed(ticket) => tickets.push(ticket),
            Claim::InProgress => in_progress += 1,
            Claim::Done(r) => panic!("nobody completed, yet Done({r:?})"),
        }
    }
    assert_eq!(tickets.len(), 1, "exactly one concurrent claim wins");
    assert_eq!(in_progress, CLAIMERS - 1);
    assert_eq!(dedup.seen("evt-1").await.unwrap(), State::InProgress);
    dedup.complete(&tickets[0]).await.unwrap();
    // After completion every concurrent claim sees Done.
    let mut handles = Vec::new();
    for _ in 0..CLAIMERS {
        let (dedup, barrier) = (dedup.clone(), Arc::clone(&barrier));
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            dedup.claim("evt-1", LONG).await.unwrap()
        }));
    }
    for h in handles {
        assert!(matches!(h.await.unwrap(), Claim::Done(None)));
    }
}

async fn dedup_concurrent_once_runs_the_body_once(c: Ctx) {
    let dedup = Dedup::new(confined(&c));
    let runs = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(CLAIMERS));
    // The body holds until every other caller has come back, so they all meet it in progress.
    let others_back = Arc::new(tokio::sync::Semaphore::new(0));
    let mut handles = Vec::new();
    for _ in 0..CLAIMERS {
        let (dedup, runs, barrier, others_back) = (
            dedup.clone(),
            Arc::clone(&runs),
            Arc::clone(&barrier),
            Arc::clone(&others_back),
        );
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            let outcome = dedup
                .once("job", || async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let waited = others_back.acquire_many((CLAIMERS - 1) as u32).await;
                    waited.map(drop).map_err(|_| "semaphore closed")
                })
                .await
                .unwrap();
            if !matches!(outcome, Once::Ran(_)) {
                others_back.add_permits(1);
            }
            outcome
        }));
    }
    let mut ran = 0;
    let mut in_progress = 0;
    for h in handles {
        match h.await.unwrap() {
            Once::Ran(Ok(())) => ran += 1,
            Once::InProgress => in_progress += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((ran, in_progress), (1, CLAIMERS - 1));
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the body ran exactly once");
    assert_eq!(dedup.seen("job").await.unwrap(), State::Done(None));
}

async fn dedup_claim_of_a_dead_owner_expires_and_can_be_claimed_again(c: Ctx) {
    let dedup = Dedup::new(confined(&c));
    let lease = ms(200);
    let dead = dedup.claim("evt", lease).await.unwrap();
    assert!(dead.is_claimed());
    // The owner dies: its ticket is simply gone, nobody completes or releases.
    drop(dead);
    assert!(matches!(
        dedup.claim("evt", LONG).await.unwrap(),
        Claim::InProgress
    ));
    let_expire(lease).await;
    assert_eq!(dedup.seen("evt").await.unwrap(), State::Free);
    let Claim::Claimed(ticket) = dedup.claim("evt", LONG).await.unwrap() else {
        panic!("an expired claim can be claimed again");
    };
    dedup.complete(&ticket).await.unwrap();
    assert_eq!(dedup.seen("evt").await.unwrap(), State::Done(None));
}

async fn dedup_late_completion_after_expiry_is_refused(c: Ctx) {
    let b = confined(&c);
    let dedup = Dedup::new(Arc::clone(&b));
    let Claim::Claimed(stale) = dedup.claim("evt", ms(200)).await.unwrap() else {
        panic!("free id");
    };
    let_expire(ms(200)).await;
    let Claim::Claimed(current) = dedup.claim("evt", LONG).await.unwrap() else {
        panic!("the stale claim expired");
    };
    match dedup.complete(&stale).await {
        Err(DedupError::Lost { id }) => assert_eq!(id, "evt"),
        other => panic!("a late completion must be refused with Lost, got {other:?}"),
    }
    assert!(matches!(
        dedup.complete_with(&stale, b"late").await,
        Err(DedupError::Lost { .. })
    ));
    assert!(matches!(
        dedup.extend(&stale, LONG).await,
        Err(DedupError::Lost { .. })
    ));
    assert!(
        !dedup.release(&stale).await.unwrap(),
        "a stale release frees nothing"
    );
    assert_eq!(
        dedup.seen("evt").await.unwrap(),
        State::InProgress,
        "the new claim survives"
    );
    match b.ttl(b"dedup:evt").await.unwrap() {
        Ttl::Remaining(d) => assert!(d > Duration::from_secs(50), "TTL disturbed: {d:?}"),
        other => panic!("the new claim's TTL is gone: {other:?}"),
    }
    dedup.complete(&current).await.unwrap();
    assert!(
        matches!(dedup.complete(&current).await, Err(DedupError::Lost { .. })),
        "completing twice is refused"
    );
    assert!(
        !dedup.release(&current).await.unwrap(),
        "a done id is not released"
    );
    assert_eq!(dedup.seen("evt").await.unwrap(), State::Done(None));
}

/// Polls `seen` until the id is free, for at most 10 s (the release after a cancellation runs
/// as a spawned task).
async fn until_free(dedup: &Dedup, id: &str) {
    let started = Instant::now();
    while dedup.seen(id).await.unwrap() != State::Free {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the claim on {id} was not released within 10 s"
        );
        tokio::time::sleep(ms(5)).await;
    }
}

async fn dedup_once_releases_on_error_and_cancel(c: Ctx) {
    let dedup = Dedup::new(confined(&c));
    let failed = dedup
        .once("evt", || async { Err::<(), _>("handler failed") })
        .await
        .unwrap();
    assert!(matches!(failed, Once::Ran(Err("handler failed"))));
    assert_eq!(
        dedup.seen("evt").await.unwrap(),
        State::Free,
        "released after an error"
    );

    // Cancelled: the body waits for a signal that never comes; the caller gives up.
    let started = Arc::new(tokio::sync::Notify::new());
    let never = Arc::new(tokio::sync::Notify::new());
    let running = {
        let (started, never) = (Arc::clone(&started), Arc::clone(&never));
        dedup.once("evt", move || async move {
            started.notify_one();
            never.notified().await;
            Ok::<_, ()>(())
        })
    };
    let mut running = Box::pin(running);
    tokio::select! {
        _ = &mut running => panic!("the body never finishes"),
        () = started.notified() => {}
    }
    assert_eq!(
        dedup.seen("evt").await.unwrap(),
        State::InProgress,
        "claimed while running"
    );
    drop(running);
    until_free(&dedup, "evt").await;

    // Cancelled by a timeout, from a spawned task that is then aborted.
    let task = {
        let dedup = dedup.clone();
        let never = Arc::clone(&never);
        tokio::spawn(async move {
            dedup
                .once("evt", move || async move {
                    never.notified().await;
                    Ok::<_, ()>(())
                })
                .await
        })
    };
    let started = Instant::now();
    while dedup.seen("evt").await.unwrap() != State::InProgress {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the task never claimed"
        );
        tokio::task::yield_now().await;
    }
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    until_free(&dedup, "evt").await;

    // Release on panic is the same release; the unit tests cover it without printing a panic
    // into this matrix. And after all that, a successful run completes it.
    let ok = dedup
        .once("evt", || async { Ok::<_, ()>(7) })
        .await
        .unwrap();
    assert!(matches!(ok, Once::Ran(Ok(7))));
    assert_eq!(dedup.seen("evt").await.unwrap(), State::Done(None));
}

async fn dedup_once_renews_its_lease_while_the_body_runs(c: Ctx) {
    // Renewed every third of the lease: a second leaves room for a loaded machine's pauses.
    let lease = ms(1000);
    let dedup = Dedup::with_options(confined(&c), DedupOptions::default().lease(lease));
    let (checked_tx, checked_rx) = tokio::sync::oneshot::channel::<()>();
    let runner = {
        let dedup = dedup.clone();
        tokio::spawn(async move {
            dedup
                .once(
                    "long",
                    || async move { checked_rx.await.map_err(|_| "dropped") },
                )
                .await
                .unwrap()
        })
    };
    // Several leases of real time: only the renewals keep the claim.
    tokio::time::sleep(ms(2500)).await;
    assert!(
        matches!(dedup.claim("long", LONG).await.unwrap(), Claim::InProgress),
        "the lease lapsed while the body ran"
    );
    checked_tx.send(()).unwrap();
    assert!(matches!(runner.await.unwrap(), Once::Ran(Ok(()))));
    assert_eq!(dedup.seen("long").await.unwrap(), State::Done(None));

    // A body that outlives a lease it cannot renew (someone deleted the claim and another
    // owner took it): the completion is refused and reported.
    let b = confined(&c);
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let runner = {
        let dedup = dedup.clone();
        tokio::spawn(async move {
            dedup
                .once(
                    "stolen",
                    || async move { go_rx.await.map_err(|_| "dropped") },
                )
                .await
                .unwrap()
        })
    };
    let started = Instant::now();
    while dedup.seen("stolen").await.unwrap() != State::InProgress {
        assert!(started.elapsed() < Duration::from_secs(10), "never claimed");
        tokio::task::yield_now().await;
    }
    assert!(b.delete(b"dedup:stolen").await.unwrap());
    let Claim::Claimed(thief) = dedup.claim("stolen", LONG).await.unwrap() else {
        panic!("the key was deleted");
    };
    go_tx.send(()).unwrap();
    assert!(matches!(runner.await.unwrap(), Once::RanButLost(Ok(()))));
    assert_eq!(
        dedup.seen("stolen").await.unwrap(),
        State::InProgress,
        "the thief's claim stays"
    );
    dedup.complete(&thief).await.unwrap();
}

async fn dedup_done_returns_the_first_result_and_keys_carry_ttls(c: Ctx) {
    let b = confined(&c);
    let retention = Duration::from_secs(3600);
    let dedup = Dedup::with_options(Arc::clone(&b), DedupOptions::default().retention(retention));
    let first = dedup
        .once_with_result("evt", || async {
            Ok::<_, ()>(b"{\"status\":\"ok\"}".to_vec())
        })
        .await
        .unwrap();
    assert!(matches!(first, Once::Ran(Ok(_))));
    let second = dedup
        .once_with_result("evt", || async { Ok::<_, ()>(b"second".to_vec()) })
        .await
        .unwrap();
    match second {
        Once::Done(Some(result)) => assert_eq!(result, b"{\"status\":\"ok\"}"),
        other => panic!("a duplicate gets the first run's result, got {other:?}"),
    }
    let Claim::Claimed(ticket) = dedup.claim("empty-result", LONG).await.unwrap() else {
        panic!("free");
    };
    dedup.complete_with(&ticket, b"").await.unwrap();
    assert_eq!(
        dedup.seen("empty-result").await.unwrap(),
        State::Done(Some(Vec::new()))
    );
    let _ = dedup.claim("pending", LONG).await.unwrap();
    for key in scan_all(&*b, b"dedup:").await {
        match b.ttl(&key).await.unwrap() {
            Ttl::Remaining(d) => assert!(d <= retention, "{key:?}: {d:?}"),
            other => panic!("dedup key {key:?} has no TTL: {other:?}"),
        }
    }
    assert_eq!(scan_all(&*b, b"dedup:").await.len(), 3);
}

async fn dedup_claim_many_reports_each_id(c: Ctx) {
    let dedup = Dedup::new(confined(&c));
    let Claim::Claimed(done) = dedup.claim("done", LONG).await.unwrap() else {
        panic!("free");
    };
    dedup.complete_with(&done, b"r").await.unwrap();
    let _busy = dedup.claim("busy", LONG).await.unwrap();
    let ids: Vec<String> = (0..50).map(|i| format!("new-{i}")).collect();
    let mut batch: Vec<&str> = vec!["done", "busy"];
    batch.extend(ids.iter().map(String::as_str));
    let outcomes = dedup.claim_many(&batch, LONG).await.unwrap();
    assert_eq!(outcomes.len(), batch.len());
    assert!(matches!(&outcomes[0], Claim::Done(Some(r)) if r == b"r"));
    assert!(matches!(outcomes[1], Claim::InProgress));
    for (i, outcome) in outcomes[2..].iter().enumerate() {
        match outcome {
            Claim::Claimed(ticket) => assert_eq!(ticket.id(), ids[i].as_bytes()),
            other => panic!("new-{i}: {other:?}"),
        }
    }
    // The same id twice in a batch is claimed once.
    let twice = dedup.claim_many(["dup", "dup"], LONG).await.unwrap();
    assert_eq!(twice.iter().filter(|c| c.is_claimed()).count(), 1);
    assert!(twice.iter().any(|c| matches!(c, Claim::InProgress)));
    // Concurrent batches over the same ids: each id has exactly one winner overall.
    let shared: Vec<String> = (0..20).map(|i| format!("shared-{i}")).collect();
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let mut handles = Vec::new();
    for _ in 0..8 {
        let (dedup, shared, barrier) = (dedup.clone(), shared.clone(), Arc::clone(&barrier));
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            let outcomes = dedup.claim_many(&shared, LONG).await.unwrap();
            outcomes.iter().map(Claim::is_claimed).collect::<Vec<_>>()
        }));
    }
    let mut winners = vec![0; shared.len()];
    for h in handles {
        for (i, won) in h.await.unwrap().into_iter().enumerate() {
            winners[i] += usize::from(won);
        }
    }
    assert!(
        winners.iter().all(|&w| w == 1),
        "winners per id: {winners:?}"
    );
}

async fn dedup_bad_input_is_typed_and_writes_nothing(c: Ctx) {
    let b = confined(&c);
    let dedup = Dedup::new(Arc::clone(&b));
    let kind = |r: Result<Claim, DedupError>| r.unwrap_err().kind();
    assert_eq!(
        kind(dedup.claim("", LONG).await),
        Some(ErrorKind::InvalidInput)
    );
    let long = vec![b'x'; ID_BYTES_MAX + 1];
    assert_eq!(kind(dedup.claim(&long, LONG).await), Some(ErrorKind::Limit));
    assert_eq!(
        kind(dedup.claim("ok", Duration::ZERO).await),
        Some(ErrorKind::InvalidInput)
    );
    assert_eq!(
        kind(dedup.claim("ok", TTL_MAX + Duration::from_secs(1)).await),
        Some(ErrorKind::InvalidInput)
    );
    assert_eq!(
        dedup.seen("").await.unwrap_err().kind(),
        Some(ErrorKind::InvalidInput)
    );
    // A batch with one bad id writes none of the good ones.
    let batch = dedup.claim_many(["good-1", "", "good-2"], LONG).await;
    assert_eq!(batch.unwrap_err().kind(), Some(ErrorKind::InvalidInput));
    let too_many: Vec<String> = (0..=CLAIM_MANY_IDS_MAX).map(|i| i.to_string()).collect();
    assert_eq!(
        dedup.claim_many(&too_many, LONG).await.unwrap_err().kind(),
        Some(ErrorKind::Limit)
    );
    assert_eq!(
        dedup
            .claim_many(["good-1"], Duration::ZERO)
            .await
            .unwrap_err()
            .kind(),
        Some(ErrorKind::InvalidInput)
    );
    let zero_retention = Dedup::with_options(
        Arc::clone(&b),
        DedupOptions::default().retention(Duration::ZERO),
    );
    let Claim::Claimed(ticket) = zero_retention.claim("t", LONG).await.unwrap() else {
        panic!("free");
    };
    assert_eq!(
        zero_retention.complete(&ticket).await.unwrap_err().kind(),
        Some(ErrorKind::InvalidInput)
    );
    assert_eq!(
        dedup
            .complete_with(&ticket, &vec![0u8; RESULT_BYTES_MAX + 1])
            .await
            .unwrap_err()
            .kind(),
        Some(ErrorKind::Limit)
    );
    assert_eq!(
        dedup.seen("t").await.unwrap(),
        State::InProgress,
        "still just claimed"
    );
    assert!(dedup.release(&ticket).await.unwrap());
    assert_eq!(
        scan_all(&*b, b"").await,
        Vec::<Vec<u8>>::new(),
        "bad input wrote something"
    );
}
