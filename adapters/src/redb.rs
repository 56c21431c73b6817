//! redb adapter (being written).
