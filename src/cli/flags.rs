//! `keel flags`: manage feature flags in a local store, through the same
//! [`FlagStore`](keel_primitives::flags::FlagStore) a service uses, so every document is
//! validated on write exactly as it would be in production (an invalid file is refused with the
//! reason and nothing is written).

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use keel_engine::Db;
use keel_primitives::Embedded;
use keel_primitives::flags::{DOC_BYTES_MAX, Flag, FlagError, FlagStore};

use super::commands::{open_existing, open_or_create};
use super::failure::{CmdResult, Failure};

/// Runs `f` on a flag store over `db` in a single-threaded runtime, then closes the store.
fn with_store<T>(
    db: Db,
    f: impl AsyncFnOnce(&FlagStore) -> Result<T, FlagError>,
) -> Result<T, Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Error(format!("cannot start an async runtime: {e}")))?;
    let result = runtime.block_on(async {
        let store = FlagStore::new(Arc::new(Embedded::new(db.clone())));
        f(&store).await
    });
    drop(runtime);
    db.close()?;
    result.map_err(|e| match e {
        FlagError::NotFound(_) => Failure::Negative(e.to_string()),
        other => Failure::Error(other.to_string()),
    })
}

/// `keel flags list`: one line per flag: key, on/off, version, default variant.
pub fn list(dir: &Path, out: &mut dyn Write) -> CmdResult {
    let flags = with_store(open_existing(dir)?, async |s| s.list().await)?;
    for f in flags {
        writeln!(
            out,
            "{}\t{}\tv{}\tdefault={}",
            f.key,
            if f.enabled { "on" } else { "off" },
            f.version,
            f.default_variant
        )?;
    }
    Ok(())
}

/// `keel flags get NAME`: the stored JSON document. Exits 1 if there is no such flag.
pub fn get(dir: &Path, name: &str, out: &mut dyn Write) -> CmdResult {
    let flag = with_store(open_existing(dir)?, async |s| s.get(name).await)?;
    match flag {
        Some(f) => {
            out.write_all(&f.to_json())?;
            writeln!(out)?;
            Ok(())
        }
        None => Err(Failure::Negative(format!("flag {name:?} does not exist"))),
    }
}

/// `keel flags set FILE`: validates the JSON document in FILE (`-`: standard input) and
/// writes it; prints the key and the version written.
pub fn set(dir: &Path, file: &Path, out: &mut dyn Write) -> CmdResult {
    let bytes = if file == Path::new("-") {
        let mut buf = Vec::new();
        std::io::stdin()
            .take(DOC_BYTES_MAX as u64 + 1)
            .read_to_end(&mut buf)?;
        buf
    } else {
        std::fs::read(file)
            .map_err(|e| Failure::Error(format!("cannot read {}: {e}", file.display())))?
    };
    // Validate before touching the store, so a bad file never creates an empty store.
    let flag = Flag::from_json(&bytes).map_err(|e| Failure::Error(e.to_string()))?;
    let version = with_store(open_or_create(dir)?, async |s| s.put(&flag).await)?;
    writeln!(out, "{} v{version}", flag.key)?;
    Ok(())
}

/// `keel flags enable NAME` / `disable NAME`: flips the kill switch; prints the new version.
pub fn set_enabled(dir: &Path, name: &str, enabled: bool, out: &mut dyn Write) -> CmdResult {
    let version = with_store(open_existing(dir)?, async |s| {
        s.set_enabled(name, enabled).await
    })?;
    writeln!(
        out,
        "{name} {} v{version}",
        if enabled { "enabled" } else { "disabled" }
    )?;
    Ok(())
}

/// `keel flags delete NAME`: prints 1 if it existed, 0 if not.
pub fn delete(dir: &Path, name: &str, out: &mut dyn Write) -> CmdResult {
    let existed = with_store(open_existing(dir)?, async |s| s.delete(name).await)?;
    writeln!(out, "{}", u8::from(existed))?;
    Ok(())
}
