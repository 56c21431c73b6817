//! The key-value contract itself: every operation's semantics, limits, TTLs, scans and
//! concurrency, on every backend.

use super::*;

pub(super) fn cases() -> Vec<Case> {
    vec![
        case!(kv_get_missing_is_none),
        case!(kv_binary_keys_and_values_round_trip),
        case!(kv_empty_value_is_a_value),
        case!(kv_set_replaces_value_and_ttl),
        case!(kv_set_nx_only_when_absent),
        case!(kv_zero_ttl_is_an_error_everywhere),
        case!(kv_ttl_over_maximum_is_an_error),
        case!(kv_oversize_key_and_value_are_refused),
        case!(kv_ttl_reports_missing_no_expiry_and_remaining),
        case!(kv_expired_key_is_invisible_to_every_operation),
        case!(kv_compare_and_swap_semantics),
        case!(kv_compare_and_swap_ttl_policies),
        case!(kv_compare_and_delete_semantics),
        case!(kv_delete_reports_whether_it_deleted),
        case!(kv_incr_counts_from_zero_and_stores_decimal),
        case!(kv_incr_stamps_ttl_only_on_create),
        case!(kv_incr_rejects_non_integers_leaving_value),
        case!(kv_incr_overflow_is_an_error_leaving_value),
        case!(kv_incr_durable_behaves_like_incr),
        case!(kv_expire_and_persist_semantics),
        case!(kv_scan_returns_prefix_keys_across_pages),
        case!(kv_scan_prefix_with_glob_characters),
        case!(kv_scan_skips_expired_keys),
        case!(kv_delete_prefix_removes_only_the_prefix),
        case!(kv_now_is_close_to_wall_clock_and_monotonic),
        case!(kv_namespaces_are_isolated),
        case!(kv_concurrent_incr_sums_exactly),
        case!(kv_concurrent_set_nx_has_one_winner),
        case!(kv_concurrent_cas_has_one_winner_per_round),
        case!(kv_scan_is_complete_under_concurrent_inserts),
    ]
}

async fn kv_get_missing_is_none(c: Ctx) {
    assert_eq!(c.b.get(&c.k("nope")).await.unwrap(), None);
    assert_eq!(c.b.get_with_ttl(&c.k("nope")).await.unwrap(), None);
}

async fn kv_binary_keys_and_values_round_trip(c: Ctx) {
    let key = c.k(b"\x00\xff\xfe bin\x00key\xc3\x28");
    let value = b"\x00\x01\xff\xfe\x80 not utf-8 \xc3\x28\x00".to_vec();
    c.b.set(&key, &value, None).await.unwrap();
    assert_eq!(c.b.get(&key).await.unwrap(), Some(value.clone()));
    let all: Vec<u8> = (0..=255u8).collect();
    c.b.set(&c.k("all-bytes"), &all, None).await.unwrap();
    assert_eq!(c.b.get(&c.k("all-bytes")).await.unwrap(), Some(all));
    assert!(c.b.compare_and_delete(&key, &value).await.unwrap());
    assert_eq!(c.b.get(&key).await.unwrap(), None);
}

async fn kv_empty_value_is_a_value(c: Ctx) {
    let key = c.k("empty");
    c.b.set(&key, b"", None).await.unwrap();
    assert_eq!(c.b.get(&key).await.unwrap(), Some(Vec::new()));
    assert_eq!(c.b.ttl(&key).await.unwrap(), Ttl::NoExpiry);
    assert!(!c.b.set_nx(&key, b"x", None).await.unwrap());
    assert!(
        c.b.compare_and_swap(&key, Some(b""), b"now", TtlPolicy::Keep)
            .await
            .unwrap()
    );
    assert_eq!(c.b.get(&key).await.unwrap(), Some(b"now".to_vec()));
    // The shortest key under this case's prefix is the prefix itself.
    c.b.set(&c.k(""), b"v", None).await.unwrap();
    assert_eq!(c.b.get(&c.k("")).await.unwrap(), Some(b"v".to_vec()));
}

async fn kv_set_replaces_value_and_ttl(c: Ctx) {
    let key = c.k("k");
    c.b.set(&key, b"one", Some(Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(matches!(c.b.ttl(&key).await.unwrap(), Ttl::Remaining(_)));
    c.b.set(&key, b"two", None).await.unwrap();
    assert_eq!(c.b.get(&key).await.unwrap(), Some(b"two".to_vec()));
    assert_eq!(
        c.b.ttl(&key).await.unwrap(),
        Ttl::NoExpiry,
        "set without a TTL clears the TTL"
    );
}

async fn kv_set_nx_only_when_absent(c: Ctx) {
    let key = c.k("k");
    assert!(c.b.set_nx(&key, b"first", None).await.unwrap());
    assert!(!c.b.set_nx(&key, b"second", None).await.unwrap());
    assert_eq!(c.b.get(&key).await.unwrap(), Some(b"first".to_vec()));
    let short = c.k("short");
    assert!(c.b.set_nx(&short, b"a", Some(ms(100))).await.unwrap());
    let_expire(ms(100)).await;
    assert!(
        c.b.set_nx(&short, b"b", None).await.unwrap(),
        "set_nx succeeds on an expired key"
    );
    assert_eq!(c.b.get(&short).await.unwrap(), Some(b"b".to_vec()));
    assert_eq!(c.b.ttl(&short).await.unwrap(), Ttl::NoExpiry);
}

async fn kv_zero_ttl_is_an_error_everywhere(c: Ctx) {
    let key = c.k("k");
    let z = Duration::ZERO;
    assert_eq!(
        kind(c.b.set(&key, b"v", Some(z)).await),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(c.b.set_nx(&key, b"v", Some(z)).await),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(c.b.incr(&key, 1, Some(z)).await),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(
            c.b.compare_and_swap(&key, None, b"v", TtlPolicy::Set(z))
                .await
        ),
        ErrorKind::InvalidInput
    );
    assert_eq!(c.b.get(&key).await.unwrap(), None, "nothing was written");
    c.b.set(&key, b"v", None).await.unwrap();
    assert_eq!(kind(c.b.expire(&key, z).await), ErrorKind::InvalidInput);
    assert_eq!(
        c.b.get(&key).await.unwrap(),
        Some(b"v".to_vec()),
        "a zero TTL never deletes"
    );
    assert_eq!(c.b.ttl(&key).await.unwrap(), Ttl::NoExpiry);
    // Sub-millisecond TTLs round up to 1 ms rather than being refused.
    c.b.set(&c.k("tiny"), b"v", Some(Duration::from_micros(10)))
        .await
        .unwrap();
}

async fn kv_ttl_over_maximum_is_an_error(c: Ctx) {
    let key = c.k("k");
    let huge = TTL_MAX + ms(1);
    assert_eq!(
        kind(c.b.set(&key, b"v", Some(huge)).await),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(c.b.incr(&key, 1, Some(huge)).await),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(c.b.incr_durable(&key, 1, Some(huge)).await),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(c.b.set_nx(&key, b"v", Some(huge)).await),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(
            c.b.compare_and_swap(&key, None, b"v", TtlPolicy::Set(huge))
                .await
        ),
        ErrorKind::InvalidInput
    );
    assert_eq!(c.b.get(&key).await.unwrap(), None);
    c.b.set(&key, b"v", None).await.unwrap();
    assert_eq!(kind(c.b.expire(&key, huge).await), ErrorKind::InvalidInput);
    assert_eq!(
        kind(
            c.b.compare_and_swap(&key, Some(b"v"), b"w", TtlPolicy::Set(huge))
                .await
        ),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        c.b.get(&key).await.unwrap(),
        Some(b"v".to_vec()),
        "nothing changed"
    );
    assert_eq!(c.b.ttl(&key).await.unwrap(), Ttl::NoExpiry);
    c.b.set(&key, b"v", Some(TTL_MAX)).await.unwrap();
    assert!(matches!(c.b.ttl(&key).await.unwrap(), Ttl::Remaining(_)));
}

async fn kv_oversize_key_and_value_are_refused(c: Ctx) {
    // One rule on every backend and every operation, reads included: an over-length key is
    // `Limit`, never a silent miss.
    let big_key = vec![b'k'; KEY_BYTES_MAX + 1];
    let big: &[u8] = &big_key;
    let b = &c.b;
    assert_eq!(kind(b.set(big, b"v", None).await), ErrorKind::Limit);
    assert_eq!(kind(b.incr(big, 1, None).await), ErrorKind::Limit);
    assert_eq!(kind(b.incr_durable(big, 1, None).await), ErrorKind::Limit);
    assert_eq!(kind(b.set_nx(big, b"v", None).await), ErrorKind::Limit);
    assert_eq!(kind(b.get(big).await), ErrorKind::Limit);
    assert_eq!(kind(b.get_with_ttl(big).await), ErrorKind::Limit);
    assert_eq!(kind(b.ttl(big).await), ErrorKind::Limit);
    assert_eq!(kind(b.delete(big).await), ErrorKind::Limit);
    assert_eq!(kind(b.persist(big).await), ErrorKind::Limit);
    assert_eq!(kind(b.expire(big, ms(1000)).await), ErrorKind::Limit);
    assert_eq!(
        kind(b.compare_and_delete(big, b"v").await),
        ErrorKind::Limit
    );
    assert_eq!(
        kind(b.compare_and_swap(big, None, b"v", TtlPolicy::Keep).await),
        ErrorKind::Limit
    );
    assert_eq!(
        kind(
            b.compare_and_swap(big, Some(b"v"), b"w", TtlPolicy::Keep)
                .await
        ),
        ErrorKind::Limit
    );
    let key = c.k("k");
    let big_value = vec![0u8; VALUE_BYTES_MAX + 1];
    assert_eq!(
        kind(c.b.set(&key, &big_value, None).await),
        ErrorKind::Limit
    );
    assert_eq!(
        kind(
            c.b.compare_and_swap(&key, None, &big_value, TtlPolicy::Keep)
                .await
        ),
        ErrorKind::Limit
    );
    assert_eq!(c.b.get(&key).await.unwrap(), None, "nothing was written");
    // Exactly at the limits is fine.
    let max_key = {
        let mut k = c.k("");
        k.resize(KEY_BYTES_MAX, b'x');
        k
    };
    c.b.set(&max_key, b"v", None).await.unwrap();
    assert_eq!(c.b.get(&max_key).await.unwrap(), Some(b"v".to_vec()));
}

async fn kv_ttl_reports_missing_no_expiry_and_remaining(c: Ctx) {
    assert_eq!(c.b.ttl(&c.k("missing")).await.unwrap(), Ttl::Missing);
    c.b.set(&c.k("forever"), b"v", None).await.unwrap();
    assert_eq!(c.b.ttl(&c.k("forever")).await.unwrap(), Ttl::NoExpiry);
    c.b.set(&c.k("soon"), b"v", Some(Duration::from_secs(30)))
        .await
        .unwrap();
    match c.b.ttl(&c.k("soon")).await.unwrap() {
        Ttl::Remaining(d) => assert!(
            d > Duration::from_secs(25) && d <= Duration::from_secs(30),
            "{d:?}"
        ),
        other => panic!("expected Remaining, got {other:?}"),
    }
    let (v, ttl) = c.b.get_with_ttl(&c.k("soon")).await.unwrap().unwrap();
    assert_eq!(v, b"v");
    let ttl = ttl.expect("has a TTL");
    assert!(
        ttl > Duration::from_secs(25) && ttl <= Duration::from_secs(30),
        "{ttl:?}"
    );
    assert_eq!(
        c.b.get_with_ttl(&c.k("forever")).await.unwrap(),
        Some((b"v".to_vec(), None))
    );
}

async fn kv_expired_key_is_invisible_to_every_operation(c: Ctx) {
    let key = c.k("k");
    c.b.set(&key, b"old", Some(ms(100))).await.unwrap();
    let_expire(ms(100)).await;
    assert_eq!(c.b.get(&key).await.unwrap(), None);
    assert_eq!(c.b.get_with_ttl(&key).await.unwrap(), None);
    assert_eq!(c.b.ttl(&key).await.unwrap(), Ttl::Missing);
    assert!(!c.b.delete(&key).await.unwrap());
    assert!(!c.b.compare_and_delete(&key, b"old").await.unwrap());
    assert!(!c.b.expire(&key, Duration::from_secs(10)).await.unwrap());
    assert!(!c.b.persist(&key).await.unwrap());
    assert!(
        !c.b.compare_and_swap(&key, Some(b"old"), b"x", TtlPolicy::Keep)
            .await
            .unwrap()
    );
    let page = c.b.scan(&c.k(""), None, 100).await.unwrap();
    assert!(page.keys.is_empty(), "scan returned an expired key");
    assert!(
        c.b.compare_and_swap(&key, None, b"new", TtlPolicy::Keep)
            .await
            .unwrap()
    );
    assert_eq!(
        c.b.ttl(&key).await.unwrap(),
        Ttl::NoExpiry,
        "an expired key's TTL is not kept"
    );
    c.b.set(&c.k("n"), b"41", Some(ms(100))).await.unwrap();
    let_expire(ms(100)).await;
    assert_eq!(
        c.b.incr(&c.k("n"), 1, None).await.unwrap(),
        1,
        "incr on an expired key starts at 0"
    );
    assert_eq!(c.b.ttl(&c.k("n")).await.unwrap(), Ttl::NoExpiry);
}

async fn kv_compare_and_swap_semantics(c: Ctx) {
    let key = c.k("k");
    assert!(
        !c.b.compare_and_swap(&key, Some(b"x"), b"y", TtlPolicy::Keep)
            .await
            .unwrap()
    );
    assert_eq!(c.b.get(&key).await.unwrap(), None);
    assert!(
        c.b.compare_and_swap(&key, None, b"a", TtlPolicy::Keep)
            .await
            .unwrap()
    );
    assert!(
        !c.b.compare_and_swap(&key, None, b"b", TtlPolicy::Keep)
            .await
            .unwrap()
    );
    assert!(
        !c.b.compare_and_swap(&key, Some(b"A"), b"b", TtlPolicy::Keep)
            .await
            .unwrap()
    );
    assert!(
        !c.b.compare_and_swap(&key, Some(b"a\0"), b"b", TtlPolicy::Keep)
            .await
            .unwrap()
    );
    assert!(
        !c.b.compare_and_swap(&key, Some(b""), b"b", TtlPolicy::Keep)
            .await
            .unwrap()
    );
    assert!(
        c.b.compare_and_swap(&key, Some(b"a"), b"b", TtlPolicy::Keep)
            .await
            .unwrap()
    );
    assert_eq!(c.b.get(&key).await.unwrap(), Some(b"b".to_vec()));
}

async fn kv_compare_and_swap_ttl_policies(c: Ctx) {
    let key = c.k("k");
    c.b.set(&key, b"a", Some(Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(
        c.b.compare_and_swap(&key, Some(b"a"), b"b", TtlPolicy::Keep)
            .await
            .unwrap()
    );
    match c.b.ttl(&key).await.unwrap() {
        Ttl::Remaining(d) => assert!(d > Duration::from_secs(50), "Keep kept {d:?}"),
        other => panic!("Keep lost the TTL: {other:?}"),
    }
    assert!(
        c.b.compare_and_swap(
            &key,
            Some(b"b"),
            b"c",
            TtlPolicy::Set(Duration::from_secs(1000))
        )
        .await
        .unwrap()
    );
    match c.b.ttl(&key).await.unwrap() {
        Ttl::Remaining(d) => assert!(d > Duration::from_secs(900), "Set gave {d:?}"),
        other => panic!("Set lost the TTL: {other:?}"),
    }
    assert!(
        c.b.compare_and_swap(&key, Some(b"c"), b"d", TtlPolicy::Clear)
            .await
            .unwrap()
    );
    assert_eq!(c.b.ttl(&key).await.unwrap(), Ttl::NoExpiry);
    let fresh = c.k("fresh");
    assert!(
        c.b.compare_and_swap(&fresh, None, b"v", TtlPolicy::Set(Duration::from_secs(30)))
            .await
            .unwrap()
    );
    assert!(matches!(c.b.ttl(&fresh).await.unwrap(), Ttl::Remaining(_)));
    let fresh2 = c.k("fresh2");
    assert!(
        c.b.compare_and_swap(&fresh2, None, b"v", TtlPolicy::Keep)
            .await
            .unwrap()
    );
    assert_eq!(c.b.ttl(&fresh2).await.unwrap(), Ttl::NoExpiry);
    // A failed swap leaves value and TTL alone.
    assert!(
        !c.b.compare_and_swap(&fresh, Some(b"zz"), b"w", TtlPolicy::Clear)
            .await
            .unwrap()
    );
    assert!(matches!(c.b.ttl(&fresh).await.unwrap(), Ttl::Remaining(_)));
}

async fn kv_compare_and_delete_semantics(c: Ctx) {
    let key = c.k("k");
    assert!(!c.b.compare_and_delete(&key, b"v").await.unwrap());
    c.b.set(&key, b"v", None).await.unwrap();
    assert!(!c.b.compare_and_delete(&key, b"V").await.unwrap());
    assert!(!c.b.compare_and_delete(&key, b"").await.unwrap());
    assert_eq!(c.b.get(&key).await.unwrap(), Some(b"v".to_vec()));
    assert!(c.b.compare_and_delete(&key, b"v").await.unwrap());
    assert_eq!(c.b.get(&key).await.unwrap(), None);
}

async fn kv_delete_reports_whether_it_deleted(c: Ctx) {
    let key = c.k("k");
    assert!(!c.b.delete(&key).await.unwrap());
    c.b.set(&key, b"v", None).await.unwrap();
    assert!(c.b.delete(&key).await.unwrap());
    assert!(!c.b.delete(&key).await.unwrap());
}

async fn kv_incr_counts_from_zero_and_stores_decimal(c: Ctx) {
    let key = c.k("n");
    assert_eq!(c.b.incr(&key, 5, None).await.unwrap(), 5);
    assert_eq!(c.b.incr(&key, -7, None).await.unwrap(), -2);
    assert_eq!(c.b.get(&key).await.unwrap(), Some(b"-2".to_vec()));
    assert_eq!(c.b.incr(&key, 0, None).await.unwrap(), -2);
    c.b.set(&key, b"-9223372036854775808", None).await.unwrap();
    assert_eq!(c.b.incr(&key, 0, None).await.unwrap(), i64::MIN);
    c.b.set(&key, b"0", None).await.unwrap();
    assert_eq!(c.b.incr(&key, i64::MAX, None).await.unwrap(), i64::MAX);
}

async fn kv_incr_stamps_ttl_only_on_create(c: Ctx) {
    let key = c.k("n");
    assert_eq!(
        c.b.incr(&key, 1, Some(Duration::from_secs(100)))
            .await
            .unwrap(),
        1
    );
    let Ttl::Remaining(first) = c.b.ttl(&key).await.unwrap() else {
        panic!("no TTL on create")
    };
    assert_eq!(
        c.b.incr(&key, 1, Some(Duration::from_secs(5000)))
            .await
            .unwrap(),
        2
    );
    let Ttl::Remaining(second) = c.b.ttl(&key).await.unwrap() else {
        panic!("TTL lost")
    };
    assert!(
        second <= first,
        "incr changed the TTL of an existing key: {first:?} -> {second:?}"
    );
    let plain = c.k("plain");
    c.b.set(&plain, b"10", None).await.unwrap();
    assert_eq!(
        c.b.incr(&plain, 1, Some(Duration::from_secs(100)))
            .await
            .unwrap(),
        11
    );
    assert_eq!(
        c.b.ttl(&plain).await.unwrap(),
        Ttl::NoExpiry,
        "incr added a TTL to an existing key"
    );
    let short = c.k("short");
    assert_eq!(c.b.incr(&short, 1, Some(ms(100))).await.unwrap(), 1);
    let_expire(ms(100)).await;
    assert_eq!(
        c.b.get(&short).await.unwrap(),
        None,
        "the TTL stamped on create expires the counter"
    );
}

async fn kv_incr_rejects_non_integers_leaving_value(c: Ctx) {
    let key = c.k("n");
    for bad in [
        &b"abc"[..],
        b"+1",
        b"01",
        b" 1",
        b"1 ",
        b"-0",
        b"1.5",
        b"",
        b"1e3",
        b"9223372036854775808",
        b"\x001",
        b"\xff",
    ] {
        c.b.set(&key, bad, Some(Duration::from_secs(60)))
            .await
            .unwrap();
        assert_eq!(
            kind(c.b.incr(&key, 1, None).await),
            ErrorKind::NotAnInteger,
            "{bad:?}"
        );
        assert_eq!(
            c.b.get(&key).await.unwrap(),
            Some(bad.to_vec()),
            "{bad:?} was changed"
        );
        assert!(
            matches!(c.b.ttl(&key).await.unwrap(), Ttl::Remaining(_)),
            "{bad:?} lost its TTL"
        );
    }
}

async fn kv_incr_overflow_is_an_error_leaving_value(c: Ctx) {
    let key = c.k("n");
    c.b.set(&key, i64::MAX.to_string().as_bytes(), None)
        .await
        .unwrap();
    assert_eq!(kind(c.b.incr(&key, 1, None).await), ErrorKind::Overflow);
    assert_eq!(
        c.b.get(&key).await.unwrap(),
        Some(i64::MAX.to_string().into_bytes())
    );
    c.b.set(&key, i64::MIN.to_string().as_bytes(), None)
        .await
        .unwrap();
    assert_eq!(kind(c.b.incr(&key, -1, None).await), ErrorKind::Overflow);
    assert_eq!(
        c.b.get(&key).await.unwrap(),
        Some(i64::MIN.to_string().into_bytes())
    );
    let fresh = c.k("fresh");
    assert_eq!(c.b.incr(&fresh, i64::MIN, None).await.unwrap(), i64::MIN);
    assert_eq!(kind(c.b.incr(&fresh, -1, None).await), ErrorKind::Overflow);
}

async fn kv_incr_durable_behaves_like_incr(c: Ctx) {
    let key = c.k("fence");
    assert_eq!(c.b.incr_durable(&key, 1, None).await.unwrap(), 1);
    assert_eq!(c.b.incr_durable(&key, 1, None).await.unwrap(), 2);
    assert_eq!(c.b.incr(&key, 1, None).await.unwrap(), 3);
    c.b.set(&key, b"x", None).await.unwrap();
    assert_eq!(
        kind(c.b.incr_durable(&key, 1, None).await),
        ErrorKind::NotAnInteger
    );
}

async fn kv_expire_and_persist_semantics(c: Ctx) {
    let key = c.k("k");
    assert!(!c.b.expire(&key, Duration::from_secs(10)).await.unwrap());
    assert!(!c.b.persist(&key).await.unwrap());
    c.b.set(&key, b"v", None).await.unwrap();
    assert!(
        !c.b.persist(&key).await.unwrap(),
        "persist on a key without TTL is false"
    );
    assert!(c.b.expire(&key, Duration::from_secs(10)).await.unwrap());
    assert!(matches!(c.b.ttl(&key).await.unwrap(), Ttl::Remaining(_)));
    assert!(c.b.persist(&key).await.unwrap());
    assert_eq!(c.b.ttl(&key).await.unwrap(), Ttl::NoExpiry);
    assert!(c.b.expire(&key, ms(100)).await.unwrap());
    let_expire(ms(100)).await;
    assert_eq!(c.b.get(&key).await.unwrap(), None, "expire really expires");
}

pub(super) async fn collect_scan(b: &dyn Backend, prefix: &[u8], limit: usize) -> Vec<Vec<u8>> {
    let mut keys = Vec::new();
    let mut cursor: Option<ScanCursor> = None;
    for _ in 0..100_000 {
        let page = b.scan(prefix, cursor.as_ref(), limit).await.unwrap();
        keys.extend(page.keys);
        match page.next {
            Some(n) => cursor = Some(n),
            None => return keys,
        }
    }
    panic!("scan did not finish");
}

async fn kv_scan_returns_prefix_keys_across_pages(c: Ctx) {
    for i in 0..250u32 {
        c.b.set(&c.k(format!("a/{i:04}")), b"v", None)
            .await
            .unwrap();
    }
    for i in 0..20u32 {
        c.b.set(&c.k(format!("b/{i:04}")), b"v", None)
            .await
            .unwrap();
    }
    c.b.set(&c.k("a"), b"v", None).await.unwrap(); // shorter than the prefix: not matched
    let mut keys = collect_scan(&*c.b, &c.k("a/"), 37).await;
    keys.sort();
    keys.dedup();
    let expected: Vec<Vec<u8>> = (0..250u32).map(|i| c.k(format!("a/{i:04}"))).collect();
    assert_eq!(keys, expected);
    let mut all = collect_scan(&*c.b, &c.k(""), 1000).await;
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 271);
    assert!(collect_scan(&*c.b, &c.k("zzz"), 10).await.is_empty());
}

async fn kv_scan_prefix_with_glob_characters(c: Ctx) {
    // Redis MATCH treats * ? [ ] \ as pattern syntax: the prefix must be escaped.
    let tricky = c.k(b"we*ird?[x]\\-\x00\xff:");
    c.b.set(&[tricky.clone(), b"1".to_vec()].concat(), b"v", None)
        .await
        .unwrap();
    c.b.set(&[tricky.clone(), b"2".to_vec()].concat(), b"v", None)
        .await
        .unwrap();
    c.b.set(&c.k(b"weXird?[x]\\-\x00\xff:3"), b"v", None)
        .await
        .unwrap();
    c.b.set(&c.k(b"we*irdZ[x]\\-\x00\xff:4"), b"v", None)
        .await
        .unwrap();
    let mut keys = collect_scan(&*c.b, &tricky, 10).await;
    keys.sort();
    keys.dedup();
    assert_eq!(
        keys,
        vec![
            [tricky.clone(), b"1".to_vec()].concat(),
            [tricky, b"2".to_vec()].concat()
        ]
    );
}

async fn kv_scan_skips_expired_keys(c: Ctx) {
    c.b.set(&c.k("live"), b"v", None).await.unwrap();
    c.b.set(&c.k("dead"), b"v", Some(ms(100))).await.unwrap();
    let_expire(ms(100)).await;
    let keys = collect_scan(&*c.b, &c.k(""), 10).await;
    assert_eq!(keys, vec![c.k("live")]);
}

async fn kv_delete_prefix_removes_only_the_prefix(c: Ctx) {
    for i in 0..30 {
        c.b.set(&c.k(format!("cache/{i}")), b"v", None)
            .await
            .unwrap();
    }
    c.b.set(&c.k("cachex"), b"v", None).await.unwrap();
    c.b.set(&c.k("other"), b"v", None).await.unwrap();
    assert_eq!(c.b.delete_prefix(&c.k("cache/")).await.unwrap(), 30);
    assert!(collect_scan(&*c.b, &c.k("cache/"), 100).await.is_empty());
    assert_eq!(c.b.get(&c.k("cachex")).await.unwrap(), Some(b"v".to_vec()));
    assert_eq!(c.b.get(&c.k("other")).await.unwrap(), Some(b"v".to_vec()));
}

async fn kv_now_is_close_to_wall_clock_and_monotonic(c: Ctx) {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let a = c.b.now_ms().await.unwrap();
    let b = c.b.now_ms().await.unwrap();
    assert!(b >= a, "trusted time went backwards: {a} -> {b}");
    assert!(
        a.abs_diff(wall) < 60_000,
        "backend time {a} is far from wall time {wall}"
    );
}

async fn kv_namespaces_are_isolated(c: Ctx) {
    let one = Namespaced::new(Arc::clone(&c.b), c.k("app1:"));
    let two = Namespaced::new(Arc::clone(&c.b), c.k("app2:"));
    one.set(b"k", b"from one", None).await.unwrap();
    two.set(b"k", b"from two", None).await.unwrap();
    assert_eq!(one.get(b"k").await.unwrap(), Some(b"from one".to_vec()));
    assert_eq!(two.get(b"k").await.unwrap(), Some(b"from two".to_vec()));
    assert_eq!(
        c.b.get(&c.k("app1:k")).await.unwrap(),
        Some(b"from one".to_vec())
    );
    let keys = collect_scan(&one, b"", 10).await;
    assert_eq!(
        keys,
        vec![b"k".to_vec()],
        "scan is confined to the namespace, prefix stripped"
    );
    assert_eq!(one.delete_prefix(b"").await.unwrap(), 1);
    assert_eq!(two.get(b"k").await.unwrap(), Some(b"from two".to_vec()));
}

const TASKS: usize = 32;

async fn kv_concurrent_incr_sums_exactly(c: Ctx) {
    let key = c.k("counter");
    // 32 × 250 increments: enough interleaving to catch a lost update, and short enough for a
    // backend whose every write is an fsynced commit (redb: 8,000 commits) on a loaded machine.
    let per_task = 250;
    let mut handles = Vec::new();
    for _ in 0..TASKS {
        let (b, key) = (Arc::clone(&c.b), key.clone());
        handles.push(tokio::spawn(async move {
            let mut last = i64::MIN;
            for _ in 0..per_task {
                let n = b
                    .incr(&key, 1, Some(Duration::from_secs(600)))
                    .await
                    .unwrap();
                assert!(n > last, "a task saw its counter go backwards");
                last = n;
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    assert_eq!(
        c.b.get(&key).await.unwrap(),
        Some((TASKS * per_task).to_string().into_bytes())
    );
}

async fn kv_concurrent_set_nx_has_one_winner(c: Ctx) {
    for round in 0..20 {
        let key = c.k(format!("race/{round}"));
        let mut handles = Vec::new();
        for task in 0..TASKS {
            let (b, key) = (Arc::clone(&c.b), key.clone());
            handles.push(tokio::spawn(async move {
                b.set_nx(
                    &key,
                    task.to_string().as_bytes(),
                    Some(Duration::from_secs(60)),
                )
                .await
                .unwrap()
            }));
        }
        let mut winners = Vec::new();
        for (task, h) in handles.into_iter().enumerate() {
            if h.await.unwrap() {
                winners.push(task);
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let stored = c.b.get(&key).await.unwrap().unwrap();
        assert_eq!(stored, winners[0].to_string().into_bytes());
    }
}

async fn kv_concurrent_cas_has_one_winner_per_round(c: Ctx) {
    let key = c.k("cas");
    c.b.set(&key, b"0", None).await.unwrap();
    for round in 0..20u32 {
        let current = round.to_string().into_bytes();
        let next = (round + 1).to_string().into_bytes();
        let mut handles = Vec::new();
        for _ in 0..TASKS {
            let (b, key, cur, nxt) = (Arc::clone(&c.b), key.clone(), current.clone(), next.clone());
            handles.push(tokio::spawn(async move {
                b.compare_and_swap(&key, Some(&cur), &nxt, TtlPolicy::Keep)
                    .await
                    .unwrap()
            }));
        }
        let mut wins = 0;
        for h in handles {
            wins += usize::from(h.await.unwrap());
        }
        assert_eq!(wins, 1, "round {round}");
        assert_eq!(c.b.get(&key).await.unwrap(), Some(next));
    }
}

async fn kv_scan_is_complete_under_concurrent_inserts(c: Ctx) {
    let stable: Vec<Vec<u8>> = (0..400u32).map(|i| c.k(format!("s/{i:05}"))).collect();
    for k in &stable {
        c.b.set(k, b"v", None).await.unwrap();
    }
    let b = Arc::clone(&c.b);
    let prefix = c.k("s/");
    let writer = tokio::spawn(async move {
        for i in 0..400u32 {
            let mut k = prefix.clone();
            k.extend_from_slice(format!("{:05}-new", i * 7 % 400).as_bytes());
            b.set(&k, b"v", None).await.unwrap();
            if i % 16 == 0 {
                tokio::task::yield_now().await;
            }
        }
    });
    let mut seen = Vec::new();
    let mut cursor: Option<ScanCursor> = None;
    loop {
        let page = c.b.scan(&c.k("s/"), cursor.as_ref(), 25).await.unwrap();
        seen.extend(page.keys);
        tokio::task::yield_now().await;
        match page.next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    writer.await.unwrap();
    seen.sort();
    for k in &stable {
        assert!(
            seen.binary_search(k).is_ok(),
            "scan missed {:?}",
            String::from_utf8_lossy(k)
        );
    }
}
