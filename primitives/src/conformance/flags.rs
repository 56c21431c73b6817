//! Feature flags on every backend: documents stored, versioned and validated on write;
//! evaluation against Unleash's published client-specification vectors; sticky, monotone
//! rollouts and weighted variants over 100,000 ids; targeting operators; the client's cache
//! invalidated within one refresh interval.

use std::collections::HashSet;

use super::*;
use crate::flags::bucket::{self, normalized_hash};
use crate::flags::{EvalContext, Flag, FlagClient, FlagError, FlagStore, Reason};
use crate::ratelimit::ManualClock;

pub(super) fn cases() -> Vec<Case> {
    vec![
        case!(flags_unleash_gradual_rollout_and_variant_vectors),
        case!(flags_rollout_is_sticky_and_monotone_over_100k_ids),
        case!(flags_variants_split_by_weight_over_100k_ids),
        case!(flags_targeting_operators),
        case!(flags_kill_switch_allow_block_and_default),
        case!(flags_invalid_documents_are_refused_and_nothing_written),
        case!(flags_versions_and_concurrent_writes),
        case!(flags_cache_invalidated_within_one_refresh_interval),
    ]
}

const IDS: u32 = 100_000;

fn rollout_flag(key: &str, percentage: u64, group: Option<&str>) -> Flag {
    let group = group.map_or(String::new(), |g| format!(r#", "group_id": "{g}""#));
    Flag::from_json(
        format!(
            r#"{{"key": "{key}", "enabled": true, "variants": {{"on": true, "off": false}},
                "default_variant": "off",
                "rules": [{{"rollout": {{"percentage": {percentage}{group},
                             "variants": [{{"name": "on", "weight": 100}}]}}}}]}}"#
        )
        .as_bytes(),
    )
    .unwrap()
}

/// A client that has loaded everything in the case's backend.
async fn loaded_client(c: &Ctx) -> FlagClient {
    let client = FlagClient::new(confined(c));
    client.refresh().await.unwrap();
    client
}

async fn flags_unleash_gradual_rollout_and_variant_vectors(c: Ctx) {
    // Unleash's client specification, 03-gradual-rollout-user-id-strategy: group id "AB12A".
    let store = FlagStore::new(confined(&c));
    for (key, pct) in [("Feature.A3", 100), ("Feature.B3", 50), ("Feature.C3", 0)] {
        store
            .put(&rollout_flag(key, pct, Some("AB12A")))
            .await
            .unwrap();
    }
    // Feature.D3: a 0% rollout, then the `default` strategy (a rule matching everyone).
    let mut d3 = rollout_flag("Feature.D3", 0, Some("AB12A"));
    d3.rules.push(crate::flags::Rule {
        constraints: vec![],
        variant: Some("on".into()),
        rollout: None,
    });
    store.put(&d3).await.unwrap();
    let client = loaded_client(&c).await;
    let on = |key: &str, ctx: EvalContext| client.evaluate(key, &ctx).value == true;
    assert!(on("Feature.A3", EvalContext::new("123")));
    assert!(
        !on("Feature.A3", EvalContext::default()),
        "no user: not in a rollout"
    );
    assert!(on("Feature.B3", EvalContext::new("122")));
    assert!(!on("Feature.B3", EvalContext::new("155")));
    assert!(!on("Feature.C3", EvalContext::new("122")));
    assert!(on("Feature.D3", EvalContext::default()));
    // Unleash's normalisation, as its Node client asserts it.
    assert_eq!(normalized_hash("gr1", "123", 100, 0), 73);
    assert_eq!(normalized_hash("groupX", "999", 100, 0), 25);
    // 08-variants (published with variant seed 0 and modulus = total weight): the same
    // normalisation reproduces every expected variant.
    let pick = |weights: &[u32], group: &str, id: &str| {
        let target = normalized_hash(group, id, weights.iter().sum(), 0);
        let mut acc = 0;
        weights
            .iter()
            .position(|w| {
                acc += w;
                acc >= target
            })
            .map(|i| i + 1)
    };
    let b = "Feature.Variants.B";
    assert_eq!(
        (pick(&[1, 1], b, "2"), pick(&[1, 1], b, "0")),
        (Some(1), Some(2))
    );
    let cv = "Feature.Variants.C";
    for (id, v) in [("315", 1), ("320", 2), ("729", 3)] {
        assert_eq!(pick(&[33, 33, 33], cv, id), Some(v), "C {id}");
    }
    let dv = "Feature.Variants.D";
    for (id, v) in [("367", 1), ("31", 2), ("19", 3)] {
        assert_eq!(pick(&[1, 49, 50], dv, id), Some(v), "D {id}");
    }
    assert_eq!(
        pick(&[33, 33, 34], "Feature.Variants.override.D", "82"),
        Some(2)
    );
    // keel's rollouts use today's Unleash variant hashing: seed 86028157, weights out of 1000.
    assert_eq!(
        bucket::variant_bucket("g", "u"),
        normalized_hash("g", "u", 1000, 86_028_157)
    );
}

async fn flags_rollout_is_sticky_and_monotone_over_100k_ids(c: Ctx) {
    let store = FlagStore::new(confined(&c));
    let mut previous: Option<HashSet<u32>> = None;
    for pct in [1u64, 10, 25, 50, 90, 100] {
        store
            .put(&rollout_flag("checkout", pct, None))
            .await
            .unwrap();
        let client = loaded_client(&c).await;
        let mut on = HashSet::new();
        for id in 0..IDS {
            let d = client.evaluate("checkout", &EvalContext::new(id.to_string()));
            if d.value == true {
                assert_eq!(d.reason, Reason::Split);
                on.insert(id);
            }
        }
        let share = on.len() as f64 / f64::from(IDS) * 100.0;
        assert!(
            (share - pct as f64).abs() <= 1.0,
            "{pct}%: observed {share:.2}%"
        );
        if let Some(prev) = &previous {
            assert!(prev.is_subset(&on), "raising to {pct}% only adds subjects");
        }
        // Sticky: evaluating again gives the same answer.
        for id in (0..IDS).step_by(997) {
            let again = client.evaluate("checkout", &EvalContext::new(id.to_string()));
            assert_eq!(again.value == true, on.contains(&id));
        }
        previous = Some(on);
    }
    // Salted by the flag key: another flag at 50% picks a different half.
    store.put(&rollout_flag("other", 50, None)).await.unwrap();
    store
        .put(&rollout_flag("checkout", 50, None))
        .await
        .unwrap();
    let client = loaded_client(&c).await;
    let both = (0..IDS)
        .filter(|id| {
            let ctx = EvalContext::new(id.to_string());
            client.evaluate("checkout", &ctx).value == true
                && client.evaluate("other", &ctx).value == true
        })
        .count();
    let overlap = both as f64 / f64::from(IDS) * 100.0;
    assert!(
        (overlap - 25.0).abs() <= 1.0,
        "independent halves overlap {overlap:.2}%"
    );
}

async fn flags_variants_split_by_weight_over_100k_ids(c: Ctx) {
    let store = FlagStore::new(confined(&c));
    let flag = Flag::from_json(
        br#"{"key": "button", "enabled": true,
             "variants": {"control": "grey", "blue": "blue", "green": "green"},
             "default_variant": "control",
             "rules": [{"rollout": {"percentage": 100, "variants": [
                 {"name": "control", "weight": 20}, {"name": "blue", "weight": 30},
                 {"name": "green", "weight": 50}]}}]}"#,
    )
    .unwrap();
    store.put(&flag).await.unwrap();
    let client = loaded_client(&c).await;
    let mut counts = std::collections::BTreeMap::new();
    for id in 0..IDS {
        let id = id.to_string();
        let d = client.evaluate("button", &EvalContext::new(id.clone()));
        // The variant is the one Unleash's normalisation picks (computed here from the hash).
        let target = normalized_hash("button", &id, 1000, 86_028_157);
        let expected = match target {
            1..=200 => "control",
            201..=500 => "blue",
            _ => "green",
        };
        assert_eq!(d.variant, expected, "id {id}");
        assert_eq!(
            d.value,
            serde_json::json!(expected.replace("control", "grey"))
        );
        *counts.entry(d.variant).or_insert(0u32) += 1;
    }
    for (variant, weight) in [("control", 20.0), ("blue", 30.0), ("green", 50.0)] {
        let share = f64::from(counts[variant]) / f64::from(IDS) * 100.0;
        assert!((share - weight).abs() <= 1.0, "{variant}: {share:.2}%");
    }
}

async fn flags_targeting_operators(c: Ctx) {
    let store = FlagStore::new(confined(&c));
    // (operator, constraint value or values, attribute value, expected match)
    let cases: &[(&str, &str, &str, bool)] = &[
        ("IN", "NL,BE", "NL", true),
        ("IN", "NL,BE", "DE", false),
        ("NOT_IN", "NL,BE", "DE", true),
        ("NOT_IN", "NL,BE", "BE", false),
        ("STR_EQ", "pro", "pro", true),
        ("STR_EQ", "pro", "Pro", false),
        ("STR_CONTAINS", "@example.", "ann@example.com", true),
        ("STR_CONTAINS", "@example.", "ann@other.com", false),
        ("STR_STARTS_WITH", "eu-", "eu-west-1", true),
        ("STR_STARTS_WITH", "eu-", "us-east-1", false),
        ("STR_ENDS_WITH", ".nl", "shop.nl", true),
        ("NUM_EQ", "3", "3.0", true),
        ("NUM_GT", "18", "21", true),
        ("NUM_GT", "18", "18", false),
        ("NUM_GTE", "18", "18", true),
        ("NUM_LT", "2.5", "2.4", true),
        ("NUM_LTE", "2.5", "2.6", false),
        ("NUM_GT", "18", "not a number", false),
        ("SEMVER_EQ", "1.2.3", "1.2.3", true),
        ("SEMVER_GT", "1.2.3", "1.10.0", true),
        ("SEMVER_GT", "1.2.3", "1.2.3-rc.1", false),
        ("SEMVER_LT", "2.0.0", "2.0.0-beta", true),
        ("SEMVER_LT", "2.0.0", "garbage", false),
    ];
    for (i, (op, value, _, _)) in cases.iter().enumerate() {
        for inverted in [false, true] {
            let key = format!("op-{i}-{inverted}");
            let values = if op.ends_with("IN") {
                format!(
                    r#""values": [{}]"#,
                    value
                        .split(',')
                        .map(|v| format!("\"{v}\""))
                        .collect::<Vec<_>>()
                        .join(",")
                )
            } else {
                format!(r#""value": "{value}""#)
            };
            let doc = format!(
                r#"{{"key": "{key}", "enabled": true, "variants": {{"on": true, "off": false}},
                    "default_variant": "off",
                    "rules": [{{"constraints": [{{"attribute": "a", "operator": "{op}", {values},
                                                  "inverted": {inverted}}}],
                               "variant": "on"}}]}}"#
            );
            store
                .put(&Flag::from_json(doc.as_bytes()).unwrap())
                .await
                .unwrap();
        }
    }
    let client = loaded_client(&c).await;
    for (i, (op, value, actual, expected)) in cases.iter().enumerate() {
        for inverted in [false, true] {
            let d = client.evaluate(
                &format!("op-{i}-{inverted}"),
                &EvalContext::new("u").with("a", *actual),
            );
            assert_eq!(
                d.value == true,
                *expected != inverted,
                "{op} {value:?} on {actual:?} (inverted: {inverted})"
            );
            let reason = if *expected != inverted {
                Reason::TargetingMatch
            } else {
                Reason::Default
            };
            assert_eq!(d.reason, reason);
        }
    }
    // Case-insensitive string operators, and a missing attribute (matches only NOT_IN).
    let flag = Flag::from_json(
        br#"{"key": "ci", "enabled": true, "variants": {"on": true, "off": false},
             "default_variant": "off",
             "rules": [{"constraints": [{"attribute": "plan", "operator": "STR_EQ",
                        "value": "PRO", "case_insensitive": true}], "variant": "on"},
                       {"constraints": [{"attribute": "missing", "operator": "NOT_IN",
                        "values": ["x"]}], "variant": "off"}]}"#,
    )
    .unwrap();
    store.put(&flag).await.unwrap();
    client.refresh().await.unwrap();
    let d = client.evaluate("ci", &EvalContext::new("u").with("plan", "pro"));
    assert_eq!(
        (d.value, d.reason),
        (serde_json::json!(true), Reason::TargetingMatch)
    );
    let d = client.evaluate("ci", &EvalContext::new("u"));
    assert_eq!(
        (d.variant.as_str(), d.reason),
        ("off", Reason::TargetingMatch)
    );
}

async fn flags_kill_switch_allow_block_and_default(c: Ctx) {
    let store = FlagStore::new(confined(&c));
    let flag = Flag::from_json(
        br#"{"key": "beta", "enabled": true, "variants": {"on": true, "off": false},
             "default_variant": "off",
             "allow": {"variant": "on", "ids": ["alice", "mallory"]},
             "block": ["mallory"],
             "rules": [{"constraints": [{"attribute": "tier", "operator": "IN",
                         "values": ["gold"]}], "variant": "on"}]}"#,
    )
    .unwrap();
    let v1 = store.put(&flag).await.unwrap();
    let client = loaded_client(&c).await;
    let eval =
        |id: &str, tier: &str| client.evaluate("beta", &EvalContext::new(id).with("tier", tier));
    let d = eval("alice", "none");
    assert_eq!(
        (d.value.clone(), d.reason, d.version),
        (serde_json::json!(true), Reason::TargetingMatch, v1)
    );
    assert_eq!(
        eval("mallory", "gold").reason,
        Reason::TargetingMatch,
        "block wins"
    );
    assert_eq!(eval("mallory", "gold").value, false);
    assert_eq!(eval("bob", "gold").value, true);
    let d = eval("bob", "silver");
    assert_eq!((d.variant.as_str(), d.reason), ("off", Reason::Default));
    // The kill switch serves the default to everyone, allow list included.
    let v2 = store.set_enabled("beta", false).await.unwrap();
    assert_eq!(v2, v1 + 1);
    client.refresh().await.unwrap();
    let d = eval("alice", "gold");
    assert_eq!(
        (d.value, d.reason, d.version),
        (serde_json::json!(false), Reason::Disabled, v2)
    );
    // A missing flag is an error reason with a null value; the typed helpers use the default.
    let d = client.evaluate("nope", &EvalContext::new("alice"));
    assert_eq!(
        (d.value, d.reason),
        (serde_json::Value::Null, Reason::Error)
    );
    assert!(
        client
            .bool_value("nope", &EvalContext::new("a"), true)
            .await
    );
    assert!(matches!(
        store.set_enabled("nope", true).await,
        Err(FlagError::NotFound(_))
    ));
}

async fn flags_invalid_documents_are_refused_and_nothing_written(c: Ctx) {
    let backend = confined(&c);
    let store = FlagStore::new(Arc::clone(&backend));
    let base = r#""enabled": true, "variants": {"a": 1, "b": 2}, "default_variant": "a""#;
    type Check = fn(&FlagError) -> bool;
    let bad: &[(&str, Check)] = &[
        (
            r#"{"key": "w", ENABLED, "rules": [{"rollout": {"percentage": 50, "variants": [{"name": "a", "weight": 60}, {"name": "b", "weight": 30}]}}]}"#,
            |e| matches!(e, FlagError::WeightsNot100 { sum: 90, .. }),
        ),
        (
            r#"{"key": "p", ENABLED, "rules": [{"rollout": {"percentage": 101, "variants": [{"name": "a", "weight": 100}]}}]}"#,
            |e| {
                matches!(
                    e,
                    FlagError::BadPercentage {
                        percentage: 101,
                        ..
                    }
                )
            },
        ),
        (
            r#"{"key": "o", ENABLED, "rules": [{"constraints": [{"attribute": "x", "operator": "REGEX", "value": ".*"}], "variant": "a"}]}"#,
            |e| matches!(e, FlagError::UnknownOperator { operator, .. } if operator == "REGEX"),
        ),
        (
            r#"{"key": "v", ENABLED, "rules": [{"variant": "zzz"}]}"#,
            |e| matches!(e, FlagError::UnknownVariant { variant, .. } if variant == "zzz"),
        ),
        (
            r#"{"key": "n", ENABLED, "rules": [{"constraints": [{"attribute": "x", "operator": "NUM_GT", "value": "ten"}], "variant": "a"}]}"#,
            |e| matches!(e, FlagError::Invalid { .. }),
        ),
        (
            r#"{"key": "s", ENABLED, "rules": [{"constraints": [{"attribute": "x", "operator": "SEMVER_GT", "value": "1.2"}], "variant": "a"}]}"#,
            |e| matches!(e, FlagError::Invalid { .. }),
        ),
        (r#"{"key": "t", ENABLED, "rules": [{}]}"#, |e| {
            matches!(e, FlagError::Invalid { .. })
        }),
        (r#"{"key": "u", ENABLED, "surprise": 1}"#, |e| {
            matches!(e, FlagError::Malformed(_))
        }),
        (r#"{"key": "m"}"#, |e| matches!(e, FlagError::Malformed(_))),
        (r#"{"key": "", ENABLED}"#, |e| {
            matches!(e, FlagError::Invalid { .. })
        }),
    ];
    for (doc, check) in bad {
        let doc = doc.replace("ENABLED", base);
        let err = Flag::from_json(doc.as_bytes()).expect_err(&doc);
        assert!(check(&err), "{doc}: {err:?}");
        // Bypassing the parser (a struct built in code) is refused by `put` too.
        if let Ok(flag) = serde_json::from_str::<Flag>(&doc) {
            let err = store.put(&flag).await.expect_err(&doc);
            assert!(check(&err), "{doc}: {err:?}");
        }
    }
    assert!(
        store.list().await.unwrap().is_empty(),
        "nothing was written"
    );
    assert_eq!(store.change_counter().await.unwrap(), 0);
    assert!(
        super::dedup::scan_all(&*backend, b"flags:")
            .await
            .is_empty()
    );
}

async fn flags_versions_and_concurrent_writes(c: Ctx) {
    const WRITERS: usize = 8;
    let store = FlagStore::new(confined(&c));
    let mut flag = rollout_flag("f", 10, None);
    flag.version = 999; // ignored: the store assigns versions
    assert_eq!(store.put(&flag).await.unwrap(), 1);
    assert_eq!(store.get("f").await.unwrap().unwrap().version, 1);
    let barrier = Arc::new(tokio::sync::Barrier::new(WRITERS));
    let mut handles = Vec::new();
    for i in 0..WRITERS {
        let (store, barrier) = (store.clone(), Arc::clone(&barrier));
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut ok = 0u64;
            for _ in 0..4 {
                match store.put(&rollout_flag("f", i as u64, None)).await {
                    Ok(_) => ok += 1,
                    Err(FlagError::Contention(_)) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            ok
        }));
    }
    let mut written = 0;
    for h in handles {
        written += h.await.unwrap();
    }
    assert!(written > 0);
    let stored = store.get("f").await.unwrap().unwrap();
    assert_eq!(
        stored.version,
        1 + written,
        "every successful write raised the version by one"
    );
    assert_eq!(store.change_counter().await.unwrap(), 1 + written as i64);
    assert!(store.delete("f").await.unwrap());
    assert!(!store.delete("f").await.unwrap());
    assert!(store.get("f").await.unwrap().is_none());
    // Flag documents are permanent by design; the change counter too.
    let backend = confined(&c);
    store.put(&rollout_flag("g", 10, None)).await.unwrap();
    assert_eq!(backend.ttl(b"flags:doc:g").await.unwrap(), Ttl::NoExpiry);
    assert_eq!(backend.ttl(b"flags:version").await.unwrap(), Ttl::NoExpiry);
}

async fn flags_cache_invalidated_within_one_refresh_interval(c: Ctx) {
    let interval = Duration::from_secs(5);
    let clock = ManualClock::new(1_000_000);
    let store = FlagStore::new(confined(&c));
    store.put(&rollout_flag("f", 0, None)).await.unwrap();
    let client = FlagClient::with_options(confined(&c), interval, Arc::new(clock.clone()));
    let ctx = EvalContext::new("someone");
    assert_eq!(client.details("f", &ctx).await.value, false);
    // Another process turns it on for everyone.
    store.put(&rollout_flag("f", 100, None)).await.unwrap();
    clock.advance(interval - ms(1));
    let d = client.details("f", &ctx).await;
    assert_eq!(
        (d.value, d.version),
        (serde_json::json!(false), 1),
        "cached within the interval"
    );
    clock.advance(ms(1));
    let d = client.details("f", &ctx).await;
    assert_eq!(
        (d.value, d.version),
        (serde_json::json!(true), 2),
        "seen one interval later"
    );
    // Deleting is seen too.
    store.delete("f").await.unwrap();
    clock.advance(interval);
    assert_eq!(client.details("f", &ctx).await.reason, Reason::Error);
    // Unchanged counter: a refresh reloads nothing.
    assert!(!client.refresh().await.unwrap());
}
