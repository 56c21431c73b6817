//! sled adapter (being written).
