//! The backends of the comparison and how each is opened: [`Target`]s reached through the
//! `Backend` contract (keel's engine, the sled, redb, Redis, Valkey and Postgres adapters),
//! and [`Native`] stores used through their own APIs (sled, redb) in their durable
//! configuration, so the adapters' overhead shows next to them.

use std::path::Path;
use std::sync::Arc;

use keel_adapters::postgres::{PostgresBackend, PostgresOptions};
use keel_adapters::redb::RedbBackend;
use keel_adapters::redis::{FencingDurability, RedisBackend, RedisOptions};
use keel_adapters::sled::{SledBackend, SledOptions};
use keel_adapters::valkey::ValkeyBackend;
use keel_engine::{Db, Durability, Options};
use keel_primitives::{Backend, Embedded};
use tempfile::TempDir;

/// Connections in a Postgres backend's pool: at least the most concurrent callers of any cell.
pub const POOL_SIZE: usize = 64;
/// Keys per batch when filling a sled store.
const LOAD_BATCH: usize = 1_000;

/// A backend reached through the `Backend` contract.
#[derive(Debug, Clone)]
pub enum Kind {
    Keel(Option<Durability>),
    Sled,
    Redb,
    Redis(String),
    Valkey(String),
    Postgres { url: String, table: &'static str },
}

#[derive(Debug, Clone)]
pub struct Target {
    /// The row label.
    pub label: &'static str,
    /// What to open, or why it cannot be (printed in its rows).
    pub kind: Result<Kind, String>,
}

/// An open contract backend and what must live as long as it.
pub struct Opened {
    /// The backend, ready for traffic.
    pub backend: Arc<dyn Backend>,
    /// The engine behind it, for keel's own stores.
    pub db: Option<Db>,
    _dir: Option<TempDir>,
}

pub fn scratch_dir(scratch: &Path, prefix: &str) -> Result<TempDir, String> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(scratch)
        .map_err(|e| format!("could not create a directory in {}: {e}", scratch.display()))
}

impl Target {
    /// Opens a fresh instance (a new directory for embedded stores; a new connection or
    /// pool for servers, whose tables and keyspaces persist between opens).
    pub async fn open(&self, scratch: &Path) -> Result<Opened, String> {
        let kind = self.kind.clone()?;
        let s = |e: keel_primitives::Error| e.to_string();
        Ok(match kind {
            Kind::Keel(durability) => {
                let (db, dir) = match durability {
                    Some(d) => {
                        let dir = scratch_dir(scratch, "keel-")?;
                        let db = Db::open(dir.path(), Options::default().durability(d))
                            .map_err(|e| e.to_string())?;
                        (db, Some(dir))
                    }
                    None => (Db::memory(Options::default()), None),
                };
                Opened {
                    backend: Arc::new(Embedded::new(db.clone())),
                    db: Some(db),
                    _dir: dir,
                }
            }
            Kind::Sled => {
                let dir = scratch_dir(scratch, "sled-adapter-")?;
                let b = SledBackend::open_with(dir.path(), SledOptions::default()).map_err(s)?;
                Opened {
                    backend: Arc::new(b),
                    db: None,
                    _dir: Some(dir),
                }
            }
            Kind::Redb => {
                let dir = scratch_dir(scratch, "redb-adapter-")?;
                let b = RedbBackend::open(dir.path().join("keel.redb")).map_err(s)?;
                Opened {
                    backend: Arc::new(b),
                    db: None,
                    _dir: Some(dir),
                }
            }
            Kind::Redis(url) => Opened {
                // This machine's Redis predates WAITAOF (7.2): fencing counters are plain
                // INCRBY there, as durable as its appendfsync setting (see BENCHMARKS.md).
                backend: Arc::new(
                    RedisBackend::connect_with(
                        &url,
                        RedisOptions::default().with_fencing(FencingDurability::BestEffort),
                    )
                    .await
                    .map_err(s)?,
                ),
                db: None,
                _dir: None,
            },
            Kind::Valkey(url) => Opened {
                backend: Arc::new(ValkeyBackend::connect(&url).await.map_err(s)?),
                db: None,
                _dir: None,
            },
            Kind::Postgres { url, table } => {
                let options = PostgresOptions {
                    table: table.to_owned(),
                    pool_size: POOL_SIZE,
                    ..PostgresOptions::default()
                };
                let b = PostgresBackend::connect_with(&url, options)
                    .await
                    .map_err(s)?;
                b.ensure_schema().await.map_err(s)?;
                Opened {
                    backend: Arc::new(b),
                    db: None,
                    _dir: None,
                }
            }
        })
    }
}

/// sled or redb through its own API, in its recommended durable configuration.
pub enum NativeStore {
    /// Every write is followed by `flush()` (sled's documented way to make writes durable).
    Sled(sled::Db),
    /// Every write is its own write transaction, committed with redb's default durability.
    Redb(redb::Database),
}

const REDB_TABLE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("bench");

pub struct Native {
    /// The row label.
    pub label: &'static str,
    /// The open store.
    pub store: NativeStore,
    /// Its directory (removed on drop).
    pub dir: TempDir,
}

pub const SLED_NATIVE: &str = "sled own API";
pub const REDB_NATIVE: &str = "redb own API";

pub fn open_native(label: &'static str, scratch: &Path) -> Result<Native, String> {
    let dir = scratch_dir(scratch, "native-")?;
    let store = if label == SLED_NATIVE {
        NativeStore::Sled(
            sled::Config::new()
                .path(dir.path())
                .open()
                .map_err(|e| format!("sled: {e}"))?,
        )
    } else {
        let db = redb::Database::create(dir.path().join("bench.redb"))
            .map_err(|e| format!("redb: {e}"))?;
        let txn = db.begin_write().map_err(|e| format!("redb: {e}"))?;
        txn.open_table(REDB_TABLE)
            .map_err(|e| format!("redb: {e}"))?;
        txn.commit().map_err(|e| format!("redb: {e}"))?;
        NativeStore::Redb(db)
    };
    Ok(Native { label, store, dir })
}

impl Native {
    /// Increments a little-endian u64 counter, durably.
    pub fn incr(&self, key: &[u8]) -> Result<(), String> {
        let bump = |old: Option<&[u8]>| {
            let n = old
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(0, u64::from_le_bytes);
            (n + 1).to_le_bytes()
        };
        match &self.store {
            NativeStore::Sled(db) => {
                db.update_and_fetch(key, |old| Some(bump(old).to_vec()))
                    .map_err(|e| format!("sled: {e}"))?;
                db.flush().map_err(|e| format!("sled: {e}"))?;
            }
            NativeStore::Redb(db) => {
                use redb::ReadableTable;
                let e = |e: redb::Error| format!("redb: {e}");
                let txn = db.begin_write().map_err(|x| e(x.into()))?;
                {
                    let mut table = txn.open_table(REDB_TABLE).map_err(|x| e(x.into()))?;
                    let next = {
                        let old = table.get(key).map_err(|x| e(x.into()))?;
                        bump(old.as_ref().map(|g| g.value()))
                    };
                    table
                        .insert(key, next.as_slice())
                        .map_err(|x| e(x.into()))?;
                }
                txn.commit().map_err(|x| e(x.into()))?;
            }
        }
        Ok(())
    }

    /// Whether `key` is present.
    pub fn get(&self, key: &[u8]) -> Result<bool, String> {
        match &self.store {
            NativeStore::Sled(db) => Ok(db.get(key).map_err(|e| format!("sled: {e}"))?.is_some()),
            NativeStore::Redb(db) => {
                use redb::ReadableDatabase;
                let e = |e: redb::Error| format!("redb: {e}");
                let txn = db.begin_read().map_err(|x| e(x.into()))?;
                let table = txn.open_table(REDB_TABLE).map_err(|x| e(x.into()))?;
                let found = table.get(key).map_err(|x| e(x.into()))?;
                Ok(found.is_some())
            }
        }
    }

    /// Writes every key with `value` in large batches, then makes them durable.
    pub fn load(&self, keys: &[Vec<u8>], value: &[u8]) -> Result<(), String> {
        match &self.store {
            NativeStore::Sled(db) => {
                for chunk in keys.chunks(LOAD_BATCH) {
                    let mut batch = sled::Batch::default();
                    for k in chunk {
                        batch.insert(k.as_slice(), value);
                    }
                    db.apply_batch(batch).map_err(|e| format!("sled: {e}"))?;
                }
                db.flush().map_err(|e| format!("sled: {e}"))?;
            }
            NativeStore::Redb(db) => {
                let e = |e: redb::Error| format!("redb: {e}");
                let txn = db.begin_write().map_err(|x| e(x.into()))?;
                {
                    let mut table = txn.open_table(REDB_TABLE).map_err(|x| e(x.into()))?;
                    for k in keys {
                        table.insert(k.as_slice(), value).map_err(|x| e(x.into()))?;
                    }
                }
                txn.commit().map_err(|x| e(x.into()))?;
            }
        }
        Ok(())
    }
}
