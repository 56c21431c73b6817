//! How a [`Cache`](super::Cache) turns values into bytes and back: [`Raw`] bytes, [`Json`]
//! (serde_json, readable in `redis-cli`) and [`Binary`] (postcard: compact, no field names, so
//! a changed struct usually fails to decode). A decode failure is never an error to the caller:
//! the cache treats it as a miss, recomputes and overwrites, with a warning.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A value that could not be encoded or decoded, with the codec's reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{codec} codec: {reason}")]
pub struct CodecError {
    /// Which codec failed.
    pub codec: &'static str,
    /// The codec's own message.
    pub reason: String,
}

/// Encodes and decodes values of type `T`. Implement it for a format of your own; the cache
/// only ever calls these two methods.
pub trait Codec<T>: Send + Sync + 'static {
    /// The bytes stored for `value`.
    ///
    /// # Errors
    /// The value cannot be represented in this format (e.g. a map with non-string keys in
    /// JSON).
    fn encode(&self, value: &T) -> Result<Vec<u8>, CodecError>;

    /// The value stored as `bytes`.
    ///
    /// # Errors
    /// The bytes are not a `T` in this format (a changed struct, a foreign writer).
    fn decode(&self, bytes: &[u8]) -> Result<T, CodecError>;
}

/// Values are bytes, stored as they are (`Vec<u8>`), or UTF-8 text (`String`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Raw;

/// serde_json: readable in a server's CLI, tolerant of added optional fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Json;

/// postcard, a compact binary serde format: smaller and faster than JSON, no field names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Binary;

impl Codec<Vec<u8>> for Raw {
    fn encode(&self, value: &Vec<u8>) -> Result<Vec<u8>, CodecError> {
        Ok(value.clone())
    }
    fn decode(&self, bytes: &[u8]) -> Result<Vec<u8>, CodecError> {
        Ok(bytes.to_vec())
    }
}

impl Codec<String> for Raw {
    fn encode(&self, value: &String) -> Result<Vec<u8>, CodecError> {
        Ok(value.as_bytes().to_vec())
    }
    fn decode(&self, bytes: &[u8]) -> Result<String, CodecError> {
        String::from_utf8(bytes.to_vec()).map_err(|e| CodecError {
            codec: "raw",
            reason: e.to_string(),
        })
    }
}

impl<T: Serialize + DeserializeOwned> Codec<T> for Json {
    fn encode(&self, value: &T) -> Result<Vec<u8>, CodecError> {
        serde_json::to_vec(value).map_err(|e| CodecError {
            codec: "json",
            reason: e.to_string(),
        })
    }
    fn decode(&self, bytes: &[u8]) -> Result<T, CodecError> {
        serde_json::from_slice(bytes).map_err(|e| CodecError {
            codec: "json",
            reason: e.to_string(),
        })
    }
}

impl<T: Serialize + DeserializeOwned> Codec<T> for Binary {
    fn encode(&self, value: &T) -> Result<Vec<u8>, CodecError> {
        postcard::to_stdvec(value).map_err(|e| CodecError {
            codec: "binary",
            reason: e.to_string(),
        })
    }
    fn decode(&self, bytes: &[u8]) -> Result<T, CodecError> {
        // postcard ignores trailing bytes; a value that leaves some was written as another
        // type, so it is a decode failure too.
        let (value, rest) = postcard::take_from_bytes(bytes).map_err(|e| CodecError {
            codec: "binary",
            reason: e.to_string(),
        })?;
        if !rest.is_empty() {
            return Err(CodecError {
                codec: "binary",
                reason: format!("{} trailing bytes after the value", rest.len()),
            });
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct V1 {
        id: u64,
        name: String,
    }
    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct V2 {
        id: u64,
        name: String,
        email: String,
    }

    #[test]
    fn every_codec_round_trips() {
        let v = V1 {
            id: 7,
            name: "ada".into(),
        };
        assert_eq!(Json.decode(&Json.encode(&v).unwrap()), Ok(v));
        let v = V1 {
            id: 7,
            name: "ada".into(),
        };
        assert_eq!(Binary.decode(&Binary.encode(&v).unwrap()), Ok(v));
        let raw = vec![0u8, 0xff, 1];
        assert_eq!(
            Codec::<Vec<u8>>::decode(&Raw, &Raw.encode(&raw).unwrap()),
            Ok(raw)
        );
    }

    #[test]
    fn a_changed_struct_fails_to_decode() {
        let old = V1 {
            id: 7,
            name: "ada".into(),
        };
        assert!(Codec::<V2>::decode(&Json, &Json.encode(&old).unwrap()).is_err());
        assert!(Codec::<V2>::decode(&Binary, &Binary.encode(&old).unwrap()).is_err());
        let new = V2 {
            id: 7,
            name: "ada".into(),
            email: "a@b".into(),
        };
        assert!(Codec::<V1>::decode(&Binary, &Binary.encode(&new).unwrap()).is_err());
        assert!(Codec::<String>::decode(&Raw, &[0xff, 0xfe]).is_err());
    }
}
