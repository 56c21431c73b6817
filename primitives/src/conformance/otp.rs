//! One-time codes and TOTP replay protection on every backend: attempts counted before the
//! comparison under concurrency, single use under concurrency, cooldown and budgets on a
//! manual clock, no enumeration through the public outcome, TOTP replays refused under
//! concurrency, the RFC vectors through the guard, and bad input.

use super::dedup::scan_all;
use super::*;
use crate::otp::totp::{Algorithm, Totp, TotpCheck, TotpGuard, TotpSecret, vectors};
use crate::otp::{
    Otp, OtpError, OtpOptions, OtpSecret, PURPOSE_BYTES_MAX, PublicOutcome, SUBJECT_BYTES_MAX,
    Verification,
};
use crate::ratelimit::{Clock, ManualClock};

pub(super) fn cases() -> Vec<Case> {
    vec![
        case!(otp_attempts_are_counted_before_the_comparison_under_concurrency),
        case!(otp_a_code_is_single_use_under_concurrency),
        case!(otp_verify_consumes_and_every_key_carries_a_ttl),
        case!(otp_cooldown_and_resend_budget_follow_the_clock),
        case!(otp_concurrent_issues_inside_a_cooldown_issue_one_code),
        case!(otp_failure_budget_spans_codes_and_subjects_without_codes),
        case!(otp_public_outcome_does_not_tell_wrong_from_unknown),
        case!(otp_totp_replay_is_refused_under_concurrency),
        case!(otp_totp_rfc6238_vectors_through_the_guard),
        case!(otp_bad_input_is_typed_and_writes_nothing),
    ]
}

/// A manual clock's start (2026-ish), far from any step or window boundary that matters.
const OTP_START_MS: u64 = 1_790_000_000_000;
const GUESSERS: usize = 100;

fn otp_on(c: &Ctx, options: OtpOptions, clock: &ManualClock) -> Otp {
    Otp::new(
        confined(c),
        OtpSecret::from_bytes(b"conformance secret, 32 bytes min").unwrap(),
        options,
    )
    .unwrap()
    .with_clock(Arc::new(clock.clone()))
}

/// A code of the configured shape (6 digits) that is not `code`.
fn wrong(code: &str) -> String {
    if code == "000000" { "000001" } else { "000000" }.to_owned()
}

async fn verify_concurrently(otp: &Otp, subject: &str, codes: Vec<String>) -> Vec<Verification> {
    let barrier = Arc::new(tokio::sync::Barrier::new(codes.len()));
    let mut handles = Vec::new();
    for code in codes {
        let (otp, subject, barrier) = (otp.clone(), subject.to_owned(), Arc::clone(&barrier));
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            otp.verify(&subject, "login", &code).await.unwrap()
        }));
    }
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

async fn otp_attempts_are_counted_before_the_comparison_under_concurrency(c: Ctx) {
    let clock = ManualClock::new(OTP_START_MS);
    let generous = OtpOptions::default()
        .max_attempts(1_000)
        .failure_budget(10_000, Duration::from_secs(3600));
    let otp = otp_on(&c, generous, &clock);
    let code = otp.issue("alice", "login").await.unwrap();
    let bad = wrong(code.code().as_str());
    let results = verify_concurrently(&otp, "alice", vec![bad.clone(); GUESSERS]).await;
    let mut left: Vec<u32> = results
        .iter()
        .map(|v| match v {
            Verification::Wrong { attempts_left } => *attempts_left,
            other => panic!("a wrong guess got {other:?}"),
        })
        .collect();
    left.sort_unstable();
    let expected: Vec<u32> = (900..1_000).collect();
    assert_eq!(
        left, expected,
        "100 concurrent wrong guesses must consume exactly 100 attempts, one each"
    );
    assert_eq!(
        otp.verify("alice", "login", code.code().as_str())
            .await
            .unwrap(),
        Verification::Verified
    );

    // With 5 attempts, 20 concurrent wrong guesses and the right code among them: at most 4
    // wrong answers, the code burns, and the right code cannot slip through after its
    // attempts are spent.
    let five = OtpOptions::default().failure_budget(10_000, Duration::from_secs(3600));
    let otp = Otp::new(
        confined(&c),
        OtpSecret::from_bytes(b"another conformance secret......").unwrap(),
        five,
    )
    .unwrap()
    .with_clock(Arc::new(clock.clone()));
    let code = otp.issue("bob", "login").await.unwrap();
    let bad = wrong(code.code().as_str());
    let mut guesses = vec![bad; 20];
    guesses.push(code.code().as_str().to_owned());
    let results = verify_concurrently(&otp, "bob", guesses).await;
    let wrong_answers = results
        .iter()
        .filter(|v| matches!(v, Verification::Wrong { .. }))
        .count();
    let verified = results.iter().filter(|v| v.is_verified()).count();
    assert!(
        wrong_answers + verified <= 5,
        "more than 5 attempts were allowed: {results:?}"
    );
    // Either the right code came within the first 5 attempts and verified, or the code
    // burnt on the fifth.
    assert!(
        verified == 1 || results.contains(&Verification::TooManyAttempts),
        "neither verified nor burnt: {results:?}"
    );
    assert_eq!(
        otp.verify("bob", "login", code.code().as_str())
            .await
            .unwrap(),
        Verification::ExpiredOrUnknown,
        "a burnt code never verifies"
    );
}

async fn otp_a_code_is_single_use_under_concurrency(c: Ctx) {
    let clock = ManualClock::new(OTP_START_MS);
    let otp = otp_on(&c, OtpOptions::default().max_attempts(100), &clock);
    let code = otp.issue("alice", "login").await.unwrap();
    let results =
        verify_concurrently(&otp, "alice", vec![code.code().as_str().to_owned(); 32]).await;
    let verified = results.iter().filter(|v| v.is_verified()).count();
    assert_eq!(
        verified, 1,
        "exactly one concurrent verification succeeds: {results:?}"
    );
    assert!(
        results
            .iter()
            .all(|v| v.is_verified() || *v == Verification::ExpiredOrUnknown)
    );
}

async fn otp_verify_consumes_and_every_key_carries_a_ttl(c: Ctx) {
    let b = confined(&c);
    let clock = ManualClock::new(OTP_START_MS);
    let otp = otp_on(&c, OtpOptions::default(), &clock);
    let code = otp.issue("alice", "login").await.unwrap();
    assert_eq!(code.code().as_str().len(), 6);
    assert!(code.code().as_str().bytes().all(|c| c.is_ascii_digit()));
    let bad = wrong(code.code().as_str());
    assert_eq!(
        otp.verify("alice", "login", &bad).await.unwrap(),
        Verification::Wrong { attempts_left: 4 }
    );
    // Another purpose has no code.
    assert_eq!(
        otp.verify("alice", "reset", code.code().as_str())
            .await
            .unwrap(),
        Verification::ExpiredOrUnknown
    );
    for key in scan_all(&*b, b"otp:").await {
        assert!(
            matches!(b.ttl(&key).await.unwrap(), Ttl::Remaining(_)),
            "{:?} has no TTL",
            String::from_utf8_lossy(&key)
        );
    }
    assert!(
        otp.verify("alice", "login", code.code().as_str())
            .await
            .unwrap()
            .is_verified()
    );
    assert_eq!(
        otp.verify("alice", "login", code.code().as_str())
            .await
            .unwrap(),
        Verification::ExpiredOrUnknown,
        "single use"
    );
    // Expiry on the clock.
    clock.advance(Duration::from_secs(60));
    let code = otp.issue("alice", "login").await.unwrap();
    clock.advance(Duration::from_secs(300));
    assert_eq!(
        otp.verify("alice", "login", code.code().as_str())
            .await
            .unwrap(),
        Verification::ExpiredOrUnknown
    );
}

async fn otp_cooldown_and_resend_budget_follow_the_clock(c: Ctx) {
    let clock = ManualClock::new(OTP_START_MS - OTP_START_MS % 3_600_000);
    let options = OtpOptions::default()
        .resend_cooldown(Duration::from_secs(30))
        .resend_budget(3, Duration::from_secs(3600));
    let otp = otp_on(&c, options, &clock);
    let first = otp.issue("alice", "login").await.unwrap();
    match otp.issue("alice", "login").await {
        Err(OtpError::Cooldown { retry_after }) => assert_eq!(retry_after, Duration::from_secs(30)),
        other => panic!("expected a cooldown, got {other:?}"),
    }
    clock.advance(Duration::from_secs(10));
    match otp.issue("alice", "login").await {
        Err(OtpError::Cooldown { retry_after }) => assert_eq!(retry_after, Duration::from_secs(20)),
        other => panic!("expected a cooldown, got {other:?}"),
    }
    // The cooldown is per purpose; the budget is per subject.
    otp.issue("alice", "reset").await.unwrap();
    clock.advance(Duration::from_secs(20));
    let third = otp.issue("alice", "login").await.unwrap();
    // The new code replaced the first.
    if first.code() != third.code() {
        assert!(
            !otp.verify("alice", "login", first.code().as_str())
                .await
                .unwrap()
                .is_verified()
        );
    }
    clock.advance(Duration::from_secs(30));
    match otp.issue("alice", "login").await {
        Err(OtpError::ResendBudget { retry_after }) => {
            assert_eq!(retry_after, Duration::from_secs(3600 - 60))
        }
        other => panic!("the fourth code in an hour is refused, got {other:?}"),
    }
    // A refusal does not consume, and other subjects have their own budget.
    otp.issue("bob", "login").await.unwrap();
    clock.advance(Duration::from_secs(3600 - 60));
    otp.issue("alice", "login").await.unwrap();
}

async fn otp_concurrent_issues_inside_a_cooldown_issue_one_code(c: Ctx) {
    let clock = ManualClock::new(OTP_START_MS);
    let otp = otp_on(
        &c,
        OtpOptions::default().resend_budget(100, Duration::from_secs(3600)),
        &clock,
    );
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let mut handles = Vec::new();
    for _ in 0..16 {
        let (otp, barrier) = (otp.clone(), Arc::clone(&barrier));
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            otp.issue("alice", "login").await
        }));
    }
    let mut issued = Vec::new();
    for h in handles {
        match h.await.unwrap() {
            Ok(code) => issued.push(code),
            Err(OtpError::Cooldown { .. }) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(
        issued.len(),
        1,
        "exactly one code is issued inside one cooldown"
    );
    assert!(
        otp.verify("alice", "login", issued[0].code().as_str())
            .await
            .unwrap()
            .is_verified()
    );
}

async fn otp_failure_budget_spans_codes_and_subjects_without_codes(c: Ctx) {
    let clock = ManualClock::new(OTP_START_MS);
    let options = OtpOptions::default()
        .max_attempts(3)
        .resend_cooldown(Duration::ZERO)
        .resend_budget(100, Duration::from_secs(3600))
        .failure_budget(10, Duration::from_secs(3600));
    let otp = otp_on(&c, options, &clock);
    // Three codes, three wrong guesses each: re-issuing does not reset the budget.
    for _ in 0..3 {
        let code = otp.issue("alice", "login").await.unwrap();
        let bad = wrong(code.code().as_str());
        for _ in 0..3 {
            assert!(
                !otp.verify("alice", "login", &bad)
                    .await
                    .unwrap()
                    .is_verified()
            );
        }
    }
    let code = otp.issue("alice", "login").await.unwrap();
    let bad = wrong(code.code().as_str());
    assert_eq!(
        otp.verify("alice", "login", &bad).await.unwrap(),
        Verification::Wrong { attempts_left: 2 },
        "the tenth failure is still compared"
    );
    match otp
        .verify("alice", "login", code.code().as_str())
        .await
        .unwrap()
    {
        Verification::Locked { retry_after } => {
            assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(3600))
        }
        other => panic!("the eleventh verification is refused, got {other:?}"),
    }
    // Other purposes share the subject's budget.
    assert!(matches!(
        otp.verify("alice", "reset", "123456").await.unwrap(),
        Verification::Locked { .. }
    ));
    // A success resets the count of consecutive failures.
    let code = otp.issue("bob", "login").await.unwrap();
    let bad = wrong(code.code().as_str());
    for _ in 0..2 {
        otp.verify("bob", "login", &bad).await.unwrap();
    }
    assert!(
        otp.verify("bob", "login", code.code().as_str())
            .await
            .unwrap()
            .is_verified()
    );
    for _ in 0..10 {
        assert!(!matches!(
            otp.verify("bob", "login", "123456").await.unwrap(),
            Verification::Locked { .. }
        ));
    }
    // Concurrent failures are counted exactly too.
    let results = verify_concurrently(&otp, "carol", vec!["123456".to_owned(); 30]).await;
    let locked = results
        .iter()
        .filter(|v| matches!(v, Verification::Locked { .. }))
        .count();
    assert_eq!(
        locked, 20,
        "10 of 30 concurrent verifications fit the budget: {results:?}"
    );
    otp.reset_failures("carol").await.unwrap();
    assert_eq!(
        otp.verify("carol", "login", "123456").await.unwrap(),
        Verification::ExpiredOrUnknown
    );
}

async fn otp_public_outcome_does_not_tell_wrong_from_unknown(c: Ctx) {
    let b = confined(&c);
    let clock = ManualClock::new(OTP_START_MS);
    let options = OtpOptions::default()
        .max_attempts(2)
        .failure_budget(4, Duration::from_secs(3600));
    let otp = otp_on(&c, options, &clock);
    let code = otp.issue("has-code", "login").await.unwrap();
    let bad = wrong(code.code().as_str());
    let mut with_code = Vec::new();
    let mut without_code = Vec::new();
    for _ in 0..6 {
        let v = otp.verify("has-code", "login", &bad).await.unwrap();
        with_code.push(v.public());
        let v = otp.verify("no-code", "login", &bad).await.unwrap();
        without_code.push(v.public());
    }
    let shape = |o: &PublicOutcome| match o {
        PublicOutcome::Locked { .. } => "locked",
        PublicOutcome::Rejected => "rejected",
        PublicOutcome::Verified => "verified",
    };
    let with_code: Vec<_> = with_code.iter().map(shape).collect();
    let without_code: Vec<_> = without_code.iter().map(shape).collect();
    assert_eq!(
        with_code,
        [
            "rejected", "rejected", "rejected", "rejected", "locked", "locked"
        ]
    );
    assert_eq!(
        with_code, without_code,
        "a client could tell the subjects apart"
    );
    // The server still has the detail.
    let code = otp.issue("detail", "login").await.unwrap();
    let bad = wrong(code.code().as_str());
    assert_eq!(
        otp.verify("detail", "login", &bad).await.unwrap(),
        Verification::Wrong { attempts_left: 1 }
    );
    assert_eq!(
        otp.verify("detail", "login", &bad).await.unwrap(),
        Verification::TooManyAttempts
    );
    assert_eq!(
        otp.verify("nobody", "login", &bad).await.unwrap(),
        Verification::ExpiredOrUnknown
    );
    // The same keys are written for both kinds of subject: a failure counter each.
    let keys = scan_all(&*b, b"otp:fail:").await;
    assert_eq!(keys.len(), 4, "has-code, no-code, detail, nobody: {keys:?}");
}

async fn otp_totp_replay_is_refused_under_concurrency(c: Ctx) {
    let b = confined(&c);
    let clock = ManualClock::new(1_234_567_890_000);
    let guard = TotpGuard::new(Arc::clone(&b)).with_clock(Arc::new(clock.clone()));
    let totp = Totp::new(TotpSecret::generate());
    let code = totp.generate_at(clock.now_ms());
    let barrier = Arc::new(tokio::sync::Barrier::new(CONCURRENT_TOTP));
    let mut handles = Vec::new();
    for _ in 0..CONCURRENT_TOTP {
        let (guard, totp, code, barrier) = (
            guard.clone(),
            totp.clone(),
            code.clone(),
            Arc::clone(&barrier),
        );
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            guard.verify("alice", &totp, &code).await.unwrap()
        }));
    }
    let mut accepted = 0;
    for h in handles {
        match h.await.unwrap() {
            TotpCheck::Accepted { .. } => accepted += 1,
            TotpCheck::Replayed { .. } => {}
            TotpCheck::Rejected => panic!("a valid code was rejected"),
        }
    }
    assert_eq!(
        accepted, 1,
        "a TOTP code is accepted once, whatever the race"
    );
    let key = b"otp:totp:alice";
    assert!(
        matches!(b.ttl(key).await.unwrap(), Ttl::Remaining(_)),
        "the step record has a TTL"
    );
    // The next step's code is accepted, then the old one is a replay even inside the window.
    clock.advance(Duration::from_secs(30));
    let next = totp.generate_at(clock.now_ms());
    assert!(
        guard
            .verify("alice", &totp, &next)
            .await
            .unwrap()
            .is_accepted()
    );
    assert!(matches!(
        guard.verify("alice", &totp, &code).await.unwrap(),
        TotpCheck::Replayed { .. }
    ));
    // A code from outside the window is rejected.
    let old = totp.generate_at(clock.now_ms() - 120_000);
    if old != next && old != code {
        assert_eq!(
            guard.verify("alice", &totp, &old).await.unwrap(),
            TotpCheck::Rejected
        );
    }
}

const CONCURRENT_TOTP: usize = 32;

async fn otp_totp_rfc6238_vectors_through_the_guard(c: Ctx) {
    let b = confined(&c);
    for (algorithm, column) in [
        (Algorithm::Sha1, 1),
        (Algorithm::Sha256, 2),
        (Algorithm::Sha512, 3),
    ] {
        let secret = TotpSecret::from_bytes(vectors::totp_secret(algorithm)).unwrap();
        let totp = Totp::new(secret)
            .with_digits(8)
            .unwrap()
            .with_algorithm(algorithm)
            .with_skew(0)
            .unwrap();
        for (row, vector) in vectors::TOTP.iter().enumerate() {
            let expected = [vector.1, vector.2, vector.3][column - 1];
            let clock = ManualClock::new(vector.0 * 1000);
            let guard = TotpGuard::new(Arc::clone(&b)).with_clock(Arc::new(clock));
            let subject = format!("{algorithm:?}-{row}");
            assert_eq!(
                guard.verify(&subject, &totp, expected).await.unwrap(),
                TotpCheck::Accepted {
                    step: vector.0 / 30
                },
                "RFC 6238 {algorithm:?} at T={}",
                vector.0
            );
            assert_eq!(
                guard.verify(&subject, &totp, expected).await.unwrap(),
                TotpCheck::Replayed {
                    step: vector.0 / 30
                }
            );
        }
    }
    // RFC 4226 Appendix D, through HOTP.
    let hotp = crate::otp::totp::Hotp::new(TotpSecret::from_bytes(vectors::HOTP_SECRET).unwrap());
    for (counter, expected) in vectors::HOTP.iter().enumerate() {
        assert_eq!(hotp.generate(counter as u64), *expected);
    }
}

async fn otp_bad_input_is_typed_and_writes_nothing(c: Ctx) {
    let b = confined(&c);
    let clock = ManualClock::new(OTP_START_MS);
    let otp = otp_on(&c, OtpOptions::default(), &clock);
    let long_subject = "s".repeat(SUBJECT_BYTES_MAX + 1);
    let long_purpose = "p".repeat(PURPOSE_BYTES_MAX + 1);
    let field = |r: Result<_, OtpError>| match r {
        Err(OtpError::Invalid { field, .. }) => field,
        Err(e) => panic!("expected Invalid, got {e}"),
        Ok(_) => panic!("bad input accepted"),
    };
    assert_eq!(field(otp.issue("", "login").await.map(drop)), "subject");
    assert_eq!(
        field(otp.issue(&long_subject, "login").await.map(drop)),
        "subject"
    );
    assert_eq!(field(otp.issue("alice", "").await.map(drop)), "purpose");
    assert_eq!(
        field(otp.issue("alice", &long_purpose).await.map(drop)),
        "purpose"
    );
    assert_eq!(
        field(otp.issue("alice", "log:in").await.map(drop)),
        "purpose"
    );
    assert_eq!(
        field(otp.verify("", "login", "123456").await.map(drop)),
        "subject"
    );
    assert_eq!(
        field(otp.verify(&long_subject, "login", "123456").await.map(drop)),
        "subject"
    );
    assert_eq!(
        field(otp.verify("alice", "", "123456").await.map(drop)),
        "purpose"
    );
    for code in ["", "12345", "1234567", "12345a", "12 456", "١٢٣٤٥٦"] {
        assert_eq!(
            field(otp.verify("alice", "login", code).await.map(drop)),
            "code",
            "{code:?}"
        );
    }
    let guard = TotpGuard::new(Arc::clone(&b)).with_clock(Arc::new(clock.clone()));
    let totp = Totp::new(TotpSecret::generate());
    assert_eq!(
        field(guard.verify("", &totp, "123456").await.map(drop)),
        "subject"
    );
    assert_eq!(
        field(guard.verify("alice", &totp, "12345x").await.map(drop)),
        "code"
    );
    let zero_ttl = Otp::new(
        Arc::clone(&b),
        OtpSecret::from_bytes(&[9u8; 32]).unwrap(),
        OtpOptions::default().ttl(Duration::ZERO),
    );
    assert_eq!(field(zero_ttl.map(drop)), "options");
    assert_eq!(
        scan_all(&*b, b"").await,
        Vec::<Vec<u8>>::new(),
        "bad input wrote something"
    );
    // A custom alphabet: characters outside it are refused before anything is counted.
    let letters = otp_on(
        &c,
        OtpOptions::default()
            .alphabet("ABCDEFGHJKMNPQRSTVWXYZ")
            .code_length(8),
        &clock,
    );
    let code = letters.issue("dave", "login").await.unwrap();
    assert_eq!(code.code().as_str().len(), 8);
    assert!(
        code.code()
            .as_str()
            .bytes()
            .all(|c| b"ABCDEFGHJKMNPQRSTVWXYZ".contains(&c))
    );
    assert_eq!(
        field(letters.verify("dave", "login", "abcdefgh").await.map(drop)),
        "code"
    );
    assert_eq!(
        field(letters.verify("dave", "login", "ABCDEFGI").await.map(drop)),
        "code"
    );
    assert!(
        letters
            .verify("dave", "login", code.code().as_str())
            .await
            .unwrap()
            .is_verified()
    );
}
