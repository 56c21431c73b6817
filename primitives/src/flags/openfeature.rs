//! An OpenFeature provider (the `open-feature` crate) backed by keel's flags (feature
//! `openfeature`), so services written against the OpenFeature API switch to keel by changing
//! one line: the provider they register.
//!
//! Evaluation goes through a [`FlagClient`]: the cache refreshes at most once per refresh
//! interval, and evaluating costs no backend call. The OpenFeature evaluation context maps onto
//! [`EvalContext`]: the targeting key is the subject (`userId`), and custom fields become string
//! attributes (booleans and numbers in their usual text form; structures are skipped). Reasons
//! map one to one (`Default`, `TargetingMatch`, `Split`, `Disabled`); a missing flag is the
//! `FlagNotFound` error and a value of the wrong type `TypeMismatch`, so the OpenFeature client
//! returns the caller's default. The flag's version is in the flag metadata as `version`.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
//! use std::sync::Arc;
//! use keel_primitives::Embedded;
//! use keel_primitives::flags::{Flag, FlagClient, FlagStore, openfeature::KeelProvider};
//! use open_feature::{EvaluationContext, OpenFeature};
//!
//! let backend = Arc::new(Embedded::memory());
//! FlagStore::new(backend.clone()).put(&Flag::from_json(br#"{
//!     "key": "new-checkout", "enabled": true,
//!     "variants": {"on": true, "off": false}, "default_variant": "off",
//!     "rules": [{"rollout": {"percentage": 100, "variants": [{"name": "on", "weight": 100}]}}]
//! }"#)?).await?;
//!
//! let mut api = OpenFeature::singleton_mut().await;
//! api.set_provider(KeelProvider::new(FlagClient::new(backend))).await;
//! let client = api.create_client();
//! drop(api);
//! let ctx = EvaluationContext::default().with_targeting_key("user-42");
//! let on = client.get_bool_value("new-checkout", Some(&ctx), None).await;
//! assert_eq!(on, Ok(true));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })
//! # }
//! ```

use std::collections::HashMap;

use async_trait::async_trait;
use open_feature::provider::{
    FeatureProvider, ProviderMetadata, ProviderStatus, ResolutionDetails,
};
use open_feature::{
    EvaluationContext, EvaluationContextFieldValue, EvaluationError, EvaluationErrorCode,
    EvaluationReason, EvaluationResult, FlagMetadata, StructValue, Value,
};

use super::{Details, EvalContext, FlagClient, Reason};

/// The `open-feature` crate this provider implements, re-exported so callers use the same
/// version.
pub use open_feature;

/// The provider's name in OpenFeature metadata.
pub const PROVIDER_NAME: &str = "keel";

/// An OpenFeature provider over a [`FlagClient`].
#[derive(Debug)]
pub struct KeelProvider {
    client: FlagClient,
    metadata: ProviderMetadata,
}

impl KeelProvider {
    /// A provider evaluating through `client`.
    pub fn new(client: FlagClient) -> Self {
        KeelProvider {
            client,
            metadata: ProviderMetadata::new(PROVIDER_NAME),
        }
    }

    async fn resolve<T>(
        &self,
        key: &str,
        ctx: &EvaluationContext,
        convert: impl Fn(&serde_json::Value) -> Option<T>,
    ) -> EvaluationResult<ResolutionDetails<T>> {
        let details = self.client.details(key, &to_eval_context(ctx)).await;
        if details.reason == Reason::Error {
            return Err(EvaluationError {
                code: EvaluationErrorCode::FlagNotFound,
                message: Some(format!("flag {key:?} does not exist")),
            });
        }
        let Some(value) = convert(&details.value) else {
            return Err(EvaluationError {
                code: EvaluationErrorCode::TypeMismatch,
                message: Some(format!(
                    "flag {key:?} variant {:?} is {}, not the type asked for",
                    details.variant, details.value
                )),
            });
        };
        Ok(resolution(value, &details))
    }
}

fn resolution<T>(value: T, details: &Details) -> ResolutionDetails<T> {
    let reason = match details.reason {
        Reason::Default => EvaluationReason::Default,
        Reason::TargetingMatch => EvaluationReason::TargetingMatch,
        Reason::Split => EvaluationReason::Split,
        Reason::Disabled => EvaluationReason::Disabled,
        Reason::Error => EvaluationReason::Error,
    };
    ResolutionDetails {
        value,
        variant: Some(details.variant.clone()),
        reason: Some(reason),
        flag_metadata: Some(FlagMetadata::default().with_value(
            "version",
            i64::try_from(details.version).unwrap_or(i64::MAX),
        )),
    }
}

fn to_eval_context(ctx: &EvaluationContext) -> EvalContext {
    let mut out = EvalContext {
        targeting_key: ctx.targeting_key.clone(),
        ..EvalContext::default()
    };
    for (name, value) in &ctx.custom_fields {
        let text = match value {
            EvaluationContextFieldValue::Bool(b) => b.to_string(),
            EvaluationContextFieldValue::Int(i) => i.to_string(),
            EvaluationContextFieldValue::Float(f) => f.to_string(),
            EvaluationContextFieldValue::String(s) => s.clone(),
            EvaluationContextFieldValue::DateTime(t) => t.to_string(),
            // Opaque structures have no attribute form.
            _ => continue,
        };
        out.attributes.insert(name.clone(), text);
    }
    out
}

fn to_value(v: &serde_json::Value) -> Option<Value> {
    Some(match v {
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64()?),
        },
        serde_json::Value::String(s) => Value::String(s.clone()),
        serde_json::Value::Array(a) => Value::Array(a.iter().filter_map(to_value).collect()),
        serde_json::Value::Object(o) => Value::Struct(to_struct(o)),
        serde_json::Value::Null => return None,
    })
}

fn to_struct(o: &serde_json::Map<String, serde_json::Value>) -> StructValue {
    StructValue {
        fields: o
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), to_value(v)?)))
            .collect::<HashMap<_, _>>(),
    }
}

#[async_trait]
impl FeatureProvider for KeelProvider {
    async fn initialize(&mut self, _context: &EvaluationContext) {
        if let Err(e) = self.client.refresh().await {
            tracing::warn!(error = %e, "keel flag provider: first load failed; will retry");
        }
    }

    fn status(&self) -> ProviderStatus {
        ProviderStatus::Ready
    }

    fn metadata(&self) -> &ProviderMetadata {
        &self.metadata
    }

    async fn resolve_bool_value(
        &self,
        flag_key: &str,
        ctx: &EvaluationContext,
    ) -> EvaluationResult<ResolutionDetails<bool>> {
        self.resolve(flag_key, ctx, serde_json::Value::as_bool)
            .await
    }

    async fn resolve_int_value(
        &self,
        flag_key: &str,
        ctx: &EvaluationContext,
    ) -> EvaluationResult<ResolutionDetails<i64>> {
        self.resolve(flag_key, ctx, serde_json::Value::as_i64).await
    }

    async fn resolve_float_value(
        &self,
        flag_key: &str,
        ctx: &EvaluationContext,
    ) -> EvaluationResult<ResolutionDetails<f64>> {
        self.resolve(flag_key, ctx, serde_json::Value::as_f64).await
    }

    async fn resolve_string_value(
        &self,
        flag_key: &str,
        ctx: &EvaluationContext,
    ) -> EvaluationResult<ResolutionDetails<String>> {
        self.resolve(flag_key, ctx, |v| v.as_str().map(str::to_owned))
            .await
    }

    async fn resolve_struct_value(
        &self,
        flag_key: &str,
        ctx: &EvaluationContext,
    ) -> EvaluationResult<ResolutionDetails<StructValue>> {
        self.resolve(flag_key, ctx, |v| v.as_object().map(to_struct))
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::Embedded;
    use crate::flags::{Flag, FlagStore};

    async fn provider() -> KeelProvider {
        let backend = Arc::new(Embedded::memory());
        let store = FlagStore::new(backend.clone());
        let flag = Flag::from_json(
            br#"{"key": "cfg", "enabled": true,
                 "variants": {"small": {"limit": 10, "name": "s"}, "big": {"limit": 1000, "name": "b"},
                              "n": 7, "x": 2.5, "label": "hello"},
                 "default_variant": "small",
                 "rules": [{"constraints": [{"attribute": "plan", "operator": "IN", "values": ["pro"]}], "variant": "big"},
                           {"constraints": [{"attribute": "age", "operator": "NUM_GTE", "value": "65"}], "variant": "n"},
                           {"constraints": [{"attribute": "beta", "operator": "IN", "values": ["true"]}], "variant": "label"}]}"#,
        )
        .unwrap();
        store.put(&flag).await.unwrap();
        let mut p = KeelProvider::new(FlagClient::new(backend));
        p.initialize(&EvaluationContext::default()).await;
        p
    }

    #[tokio::test]
    async fn resolves_each_type_with_reason_variant_and_version() {
        let p = provider().await;
        let pro = EvaluationContext::default()
            .with_targeting_key("u1")
            .with_custom_field("plan", "pro");
        let d = p.resolve_struct_value("cfg", &pro).await.unwrap();
        assert_eq!(d.value.fields["limit"], Value::Int(1000));
        assert_eq!(d.variant.as_deref(), Some("big"));
        assert_eq!(d.reason, Some(EvaluationReason::TargetingMatch));
        assert_eq!(
            d.flag_metadata.unwrap().values["version"],
            open_feature::FlagMetadataValue::Int(1)
        );
        let old = EvaluationContext::default()
            .with_targeting_key("u2")
            .with_custom_field("age", 70);
        assert_eq!(p.resolve_int_value("cfg", &old).await.unwrap().value, 7);
        assert_eq!(p.resolve_float_value("cfg", &old).await.unwrap().value, 7.0);
        let beta = EvaluationContext::default().with_custom_field("beta", true);
        assert_eq!(
            p.resolve_string_value("cfg", &beta).await.unwrap().value,
            "hello"
        );
        let d = p
            .resolve_struct_value("cfg", &EvaluationContext::default())
            .await
            .unwrap();
        assert_eq!(d.reason, Some(EvaluationReason::Default));
    }

    #[tokio::test]
    async fn missing_flags_and_wrong_types_are_typed_errors() {
        let p = provider().await;
        let ctx = EvaluationContext::default();
        let e = p.resolve_bool_value("nope", &ctx).await.unwrap_err();
        assert_eq!(e.code, EvaluationErrorCode::FlagNotFound);
        let e = p.resolve_bool_value("cfg", &ctx).await.unwrap_err();
        assert_eq!(e.code, EvaluationErrorCode::TypeMismatch);
    }
}
