//! valkey adapter (being written).
