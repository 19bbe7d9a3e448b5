//! Who may call, as which tenant, and how much.
//!
//! API keys are kept only as SHA-256 digests (a leaked keys file gives no key
//! away) and map to tenants. Callers send a key as `authorization: Bearer KEY`
//! (gRPC metadata or HTTP header) or `x-api-key: KEY`. Each tenant has a bound
//! on concurrent calls (a live stream holds its place until it ends) and a
//! request rate (a token bucket refilled every second). Without a keys file the
//! server is open: callers name their tenant with `x-tenant` and the default
//! limits apply; the ingest refuses to run open on a non-loopback address
//! unless told to.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Limits of one tenant; 0 means unbounded.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Calls in progress at once (a live stream counts until it ends).
    #[serde(default)]
    pub max_concurrent: u32,
    /// Calls started per minute.
    #[serde(default)]
    pub requests_per_minute: u32,
}

/// One key of the keys file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    tenant: String,
    /// Hex SHA-256 of the key.
    sha256: String,
}

/// The keys file (TOML).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessFile {
    #[serde(default)]
    keys: Vec<KeyEntry>,
    /// Limits by tenant.
    #[serde(default)]
    tenants: HashMap<String, Limits>,
    /// Limits of tenants not listed under `tenants`.
    #[serde(default)]
    default: Limits,
}

/// The hex SHA-256 digest under which a key is stored.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No key, or a key that is not known.
    Unauthenticated(String),
    /// The tenant's concurrency or rate limit is reached.
    Exhausted(String),
    /// The caller named its tenant in a way the server does not take.
    Invalid(String),
}

/// Longest `x-tenant` name an open server takes.
pub const MAX_TENANT_CHARS: usize = 64;
/// Tenants an open server tracks at once: names are the caller's to choose,
/// so idle ones are forgotten before a new one is refused.
pub const MAX_OPEN_TENANTS: usize = 10_000;

impl From<Denied> for tonic::Status {
    fn from(d: Denied) -> Self {
        match d {
            Denied::Unauthenticated(m) => tonic::Status::unauthenticated(m),
            Denied::Exhausted(m) => tonic::Status::resource_exhausted(m),
            Denied::Invalid(m) => tonic::Status::invalid_argument(m),
        }
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

struct Tenant {
    limits: Limits,
    calls: Arc<Semaphore>,
    bucket: Mutex<Bucket>,
}

impl Tenant {
    fn new(limits: Limits) -> Self {
        let calls = if limits.max_concurrent == 0 {
            Semaphore::MAX_PERMITS
        } else {
            limits.max_concurrent as usize
        };
        Self {
            limits,
            calls: Arc::new(Semaphore::new(calls)),
            bucket: Mutex::new(Bucket {
                tokens: f64::from(limits.requests_per_minute),
                at: Instant::now(),
            }),
        }
    }
}

/// A call that may go ahead: its tenant, and its place among the tenant's calls.
#[derive(Debug)]
pub struct Grant {
    /// The caller's tenant.
    pub tenant: String,
    _call: OwnedSemaphorePermit,
}

/// The access policy of an ingest replica.
pub struct Access {
    /// Tenant by key digest; `None` when the server is open.
    keys: Option<HashMap<String, String>>,
    limits: HashMap<String, Limits>,
    default: Limits,
    tenants: Mutex<HashMap<String, Arc<Tenant>>>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("keys", &self.keys.as_ref().map(HashMap::len))
            .field("limits", &self.limits)
            .field("default", &self.default)
            .finish()
    }
}

impl Access {
    /// An open server: no keys, tenants named by the caller, `default` limits.
    pub fn open(default: Limits) -> Self {
        Self {
            keys: None,
            limits: HashMap::new(),
            default,
            tenants: Mutex::new(HashMap::new()),
        }
    }

    /// The policy of a parsed keys file; errors name the entry to fix.
    pub fn from_file(f: AccessFile) -> anyhow::Result<Self> {
        let mut keys = HashMap::new();
        for (i, k) in f.keys.into_iter().enumerate() {
            let digest = k.sha256.trim().to_ascii_lowercase();
            anyhow::ensure!(
                digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
                "keys[{i}] (tenant {:?}): sha256 must be 64 hex digits (`nexus keys hash KEY` prints it)",
                k.tenant
            );
            anyhow::ensure!(!k.tenant.trim().is_empty(), "keys[{i}]: tenant is empty");
            if let Some(other) = keys.insert(digest, k.tenant.clone()) {
                anyhow::ensure!(
                    other == k.tenant,
                    "keys[{i}]: the same key is given to tenants {other:?} and {:?}",
                    k.tenant
                );
            }
        }
        anyhow::ensure!(!keys.is_empty(), "the keys file lists no keys");
        Ok(Self {
            keys: Some(keys),
            limits: f.tenants,
            default: f.default,
            tenants: Mutex::new(HashMap::new()),
        })
    }

    /// Reads a keys file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading the keys file {}: {e}", path.display()))?;
        let file: AccessFile = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("keys file {}: {e}", path.display()))?;
        Self::from_file(file)
    }

    /// Whether calls need a key.
    pub fn requires_keys(&self) -> bool {
        self.keys.is_some()
    }

    /// Whether several tenants share the fleet: the keys name two or more.
    /// Only then does the decoder pool keep a reserve for tenants below their
    /// share (`--pool-reserve`): a lone tenant gets every slot, and on an
    /// open server callers name their own tenant, so no share can be kept.
    pub fn tenants_share_pool(&self) -> bool {
        self.keys.as_ref().is_some_and(|k| {
            let mut tenants = k.values();
            tenants
                .next()
                .is_some_and(|first| tenants.any(|t| t != first))
        })
    }

    /// Admits one call. `authorization` is the `authorization` header or
    /// metadata, `api_key` the `x-api-key` one, `tenant_hint` the `x-tenant`
    /// one (honoured only on an open server).
    pub fn admit(
        &self,
        authorization: Option<&str>,
        api_key: Option<&str>,
        tenant_hint: Option<&str>,
    ) -> Result<Grant, Denied> {
        let tenant = self.authenticate(authorization, api_key, tenant_hint)?;
        self.limit(tenant)
    }

    /// The caller's tenant, without taking a place among its calls.
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
        api_key: Option<&str>,
        tenant_hint: Option<&str>,
    ) -> Result<String, Denied> {
        Ok(match &self.keys {
            None => {
                let t = tenant_hint
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .unwrap_or("default");
                let chars = t.chars().count();
                if chars > MAX_TENANT_CHARS || t.chars().any(char::is_control) {
                    return Err(Denied::Invalid(format!(
                        "x-tenant is {chars} characters; the limit is {MAX_TENANT_CHARS} printable characters"
                    )));
                }
                t.to_owned()
            }
            Some(keys) => {
                let key = match (authorization, api_key) {
                    (Some(a), _) => {
                        let a = a.trim();
                        let Some(k) = a
                            .strip_prefix("Bearer ")
                            .or_else(|| a.strip_prefix("bearer "))
                        else {
                            return Err(Denied::Unauthenticated(
                                "the authorization header must be \"Bearer <API key>\"".into(),
                            ));
                        };
                        k.trim()
                    }
                    (None, Some(k)) => k.trim(),
                    (None, None) => {
                        return Err(Denied::Unauthenticated(
                            "an API key is required: send \"authorization: Bearer <API key>\""
                                .into(),
                        ));
                    }
                };
                match keys.get(&hash_key(key)) {
                    Some(t) => t.clone(),
                    None => {
                        return Err(Denied::Unauthenticated(
                            "the API key is not valid; check the key or ask for a new one".into(),
                        ));
                    }
                }
            }
        })
    }

    /// Takes a place among `tenant`'s calls and a token of its rate.
    pub fn limit(&self, tenant: String) -> Result<Grant, Denied> {
        let state = {
            let mut tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
            if self.keys.is_none()
                && tenants.len() >= MAX_OPEN_TENANTS
                && !tenants.contains_key(&tenant)
            {
                // Forget tenants with no call in progress (their rate buckets
                // restart): each call's permit holds a clone of `calls`.
                tenants.retain(|_, t| Arc::strong_count(&t.calls) > 1);
                if tenants.len() >= MAX_OPEN_TENANTS {
                    return Err(Denied::Exhausted(format!(
                        "{MAX_OPEN_TENANTS} tenants have calls in progress on this open server; retry later"
                    )));
                }
            }
            tenants
                .entry(tenant.clone())
                .or_insert_with(|| {
                    Arc::new(Tenant::new(
                        self.limits.get(&tenant).copied().unwrap_or(self.default),
                    ))
                })
                .clone()
        };
        let rpm = state.limits.requests_per_minute;
        if rpm > 0 {
            let mut b = state.bucket.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let per_s = f64::from(rpm) / 60.0;
            b.tokens =
                (b.tokens + now.duration_since(b.at).as_secs_f64() * per_s).min(f64::from(rpm));
            b.at = now;
            if b.tokens < 1.0 {
                let wait = ((1.0 - b.tokens) / per_s).ceil().max(1.0);
                return Err(Denied::Exhausted(format!(
                    "tenant {tenant:?} is over its rate of {rpm} requests per minute; retry in {wait} s"
                )));
            }
            b.tokens -= 1.0;
        }
        let call = state.calls.clone().try_acquire_owned().map_err(|_| {
            Denied::Exhausted(format!(
                "tenant {tenant:?} has its maximum of {} calls in progress; retry when one ends",
                state.limits.max_concurrent
            ))
        })?;
        Ok(Grant {
            tenant,
            _call: call,
        })
    }

    /// The tenant of a gRPC call, by its metadata.
    pub fn authenticate_grpc(
        &self,
        meta: &tonic::metadata::MetadataMap,
    ) -> Result<String, tonic::Status> {
        let get = |k: &str| meta.get(k).and_then(|v| v.to_str().ok());
        Ok(self.authenticate(get("authorization"), get("x-api-key"), get("x-tenant"))?)
    }

    /// Admits a gRPC call by its metadata.
    pub fn admit_grpc(&self, meta: &tonic::metadata::MetadataMap) -> Result<Grant, tonic::Status> {
        let get = |k: &str| meta.get(k).and_then(|v| v.to_str().ok());
        Ok(self.admit(get("authorization"), get("x-api-key"), get("x-tenant"))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Access {
        let file: AccessFile = toml::from_str(&format!(
            r#"
            [[keys]]
            tenant = "acme"
            sha256 = "{}"
            [[keys]]
            tenant = "beta"
            sha256 = "{}"
            [tenants.acme]
            max_concurrent = 1
            requests_per_minute = 2
            "#,
            hash_key("k-acme"),
            hash_key("k-beta")
        ))
        .unwrap();
        Access::from_file(file).unwrap()
    }

    #[test]
    fn keys_map_to_tenants_and_unknown_keys_are_refused() {
        let a = policy();
        assert_eq!(
            a.admit(Some("Bearer k-beta"), None, None).unwrap().tenant,
            "beta"
        );
        assert_eq!(
            a.admit(None, Some("k-beta"), Some("acme")).unwrap().tenant,
            "beta"
        );
        let e = a.admit(None, None, Some("acme")).unwrap_err();
        assert!(
            matches!(&e, Denied::Unauthenticated(m) if m.contains("API key is required")),
            "{e:?}"
        );
        let e = a.admit(Some("Bearer nope"), None, None).unwrap_err();
        assert!(
            matches!(&e, Denied::Unauthenticated(m) if m.contains("not valid")),
            "{e:?}"
        );
        let e = a.admit(Some("Basic abc"), None, None).unwrap_err();
        assert!(
            matches!(&e, Denied::Unauthenticated(m) if m.contains("Bearer")),
            "{e:?}"
        );
    }

    #[test]
    fn concurrency_and_rate_are_bounded_per_tenant() {
        let a = policy();
        let g = a.admit(Some("Bearer k-acme"), None, None).unwrap();
        let e = a.admit(Some("Bearer k-acme"), None, None).unwrap_err();
        assert!(
            matches!(&e, Denied::Exhausted(m) if m.contains("maximum of 1 calls")),
            "{e:?}"
        );
        // Another tenant is not affected.
        let _b = a.admit(Some("Bearer k-beta"), None, None).unwrap();
        drop(g);
        // Two calls a minute, the refused one included: the third is refused.
        let e = a.admit(Some("Bearer k-acme"), None, None).unwrap_err();
        assert!(
            matches!(&e, Denied::Exhausted(m) if m.contains("2 requests per minute")),
            "{e:?}"
        );
    }

    #[test]
    fn bad_files_say_what_to_fix() {
        let f: AccessFile = toml::from_str("[[keys]]\ntenant = \"a\"\nsha256 = \"abc\"\n").unwrap();
        let e = Access::from_file(f).unwrap_err().to_string();
        assert!(e.contains("64 hex digits"), "{e}");
        assert!(toml::from_str::<AccessFile>("[[keys]]\ntenant = \"a\"\nkey = \"x\"\n").is_err());
    }

    #[test]
    fn open_servers_take_the_named_tenant() {
        let a = Access::open(Limits::default());
        assert!(!a.requires_keys());
        assert_eq!(a.admit(None, None, Some("x")).unwrap().tenant, "x");
        assert_eq!(a.admit(None, None, None).unwrap().tenant, "default");
        let e = a.admit(None, None, Some(&"t".repeat(65))).unwrap_err();
        assert!(
            matches!(&e, Denied::Invalid(m) if m.contains("the limit is 64")),
            "{e:?}"
        );
    }

    #[test]
    fn rotating_tenant_names_cannot_grow_the_table() {
        let a = Access::open(Limits {
            max_concurrent: 1,
            requests_per_minute: 0,
        });
        let held: Vec<Grant> = (0..MAX_OPEN_TENANTS)
            .map(|i| a.admit(None, None, Some(&format!("t{i}"))).unwrap())
            .collect();
        // Every tracked tenant has a call in progress: a new name is refused.
        let e = a.admit(None, None, Some("one-more")).unwrap_err();
        assert!(matches!(e, Denied::Exhausted(_)), "{e:?}");
        drop(held);
        // Once they are idle they are forgotten and the table stays bounded.
        for i in 0..3 * MAX_OPEN_TENANTS {
            drop(a.admit(None, None, Some(&format!("r{i}"))).unwrap());
        }
        assert!(a.tenants.lock().unwrap().len() <= MAX_OPEN_TENANTS);
    }
}
