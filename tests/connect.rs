//! `keel::connect` picks the backend from the URL, and refuses what it cannot open with a
//! clear, classified error.

use keel::ErrorKind;

#[tokio::test]
async fn memory_and_paths_open_the_embedded_engine() {
    let b = keel::connect("memory://").await.unwrap();
    assert_eq!(b.name(), "memory");
    b.set(b"k", b"v", None).await.unwrap();
    assert_eq!(b.get(b"k").await.unwrap(), Some(b"v".to_vec()));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let b = keel::connect(path.to_str().unwrap()).await.unwrap();
    assert_eq!(b.name(), "embedded");
    b.set(b"k", b"v", None).await.unwrap();
    drop(b);
    let b = keel::connect(&format!("file://{}", path.display()))
        .await
        .unwrap();
    assert_eq!(
        b.get(b"k").await.unwrap(),
        Some(b"v".to_vec()),
        "same store by file: URL"
    );
}

#[tokio::test]
async fn a_second_open_of_an_embedded_path_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap().to_owned();
    let _first = keel::connect(&path).await.unwrap();
    let err = keel::connect(&path)
        .await
        .err()
        .expect("second open must fail");
    assert_eq!(err.kind(), ErrorKind::Locked);
}

#[tokio::test]
async fn unknown_schemes_are_invalid_input() {
    let err = keel::connect("mongodb://localhost").await.err().unwrap();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(
        err.to_string()
            .contains("unknown backend scheme `mongodb:`"),
        "{err}"
    );
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn an_unreachable_server_is_a_clear_error() {
    // Port 1 on loopback: nothing listens there.
    let err = keel::connect("redis://127.0.0.1:1/")
        .await
        .err()
        .expect("must fail");
    assert!(
        err.kind().is_retryable() || err.kind() == ErrorKind::Permanent,
        "{err:?}"
    );
    assert!(!err.to_string().is_empty());
}
