//! Bearer-style authentication tokens, as DAP deployments use them between aggregators and from
//! the collector: `DAP-Auth-Token: <t>` or `Authorization: Bearer <t>`.

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

/// Name of the DAP-specific authentication header.
pub const DAP_AUTH_HEADER: &str = "DAP-Auth-Token";

/// The `Authorization` header's scheme and the space after it.
const BEARER: &[u8] = b"Bearer ";

/// A shared secret presented on requests between DAP participants.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "token")]
pub enum AuthenticationToken {
    /// Sent as `DAP-Auth-Token: <token>`.
    DapAuth(String),
    /// Sent as `Authorization: Bearer <token>`.
    Bearer(String),
}

impl std::fmt::Debug for AuthenticationToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never log secrets.
        match self {
            Self::DapAuth(_) => f.write_str("DapAuth(<redacted>)"),
            Self::Bearer(_) => f.write_str("Bearer(<redacted>)"),
        }
    }
}

impl AuthenticationToken {
    /// A fresh random token (32 random bytes, base64url), sent as `DAP-Auth-Token`.
    pub fn random() -> Self {
        use base64::Engine;
        let bytes: [u8; 32] = rand::random();
        Self::DapAuth(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
    }

    /// The secret itself.
    pub fn token(&self) -> &str {
        match self {
            Self::DapAuth(t) | Self::Bearer(t) => t,
        }
    }

    /// The header name and value to send.
    pub fn request_header(&self) -> (&'static str, String) {
        match self {
            Self::DapAuth(t) => (DAP_AUTH_HEADER, t.clone()),
            Self::Bearer(t) => ("Authorization", format!("Bearer {t}")),
        }
    }

    /// Whether a request's headers carry this token, in either form (the `Bearer` scheme's name
    /// in any case, as HTTP's schemes are); compared in constant time. An empty token is never
    /// presented: an empty header must not authenticate anyone.
    pub fn is_presented(
        &self,
        dap_auth_header: Option<&[u8]>,
        authorization: Option<&[u8]>,
    ) -> bool {
        let want = self.token().as_bytes();
        if want.is_empty() {
            return false;
        }
        let by_dap = dap_auth_header.is_some_and(|got| bool::from(got.ct_eq(want)));
        let by_bearer = authorization
            .and_then(|v| {
                let (scheme, token) = v.split_at_checked(BEARER.len())?;
                scheme.eq_ignore_ascii_case(BEARER).then_some(token)
            })
            .is_some_and(|got| bool::from(got.ct_eq(want)));
        by_dap | by_bearer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn either_header_form_is_accepted() {
        let t = AuthenticationToken::DapAuth("secret".into());
        assert!(t.is_presented(Some(b"secret"), None));
        assert!(t.is_presented(None, Some(b"Bearer secret")));
        assert!(!t.is_presented(Some(b"secreT"), None));
        assert!(!t.is_presented(None, Some(b"secret")));
        assert!(!t.is_presented(None, None));
        assert!(t.is_presented(None, Some(b"bearer secret")));
        assert!(t.is_presented(None, Some(b"BEARER secret")));
        assert!(!t.is_presented(None, Some(b"Bearer")));
        assert!(!t.is_presented(None, Some(b"Basic secret")));
        assert!(!format!("{t:?}").contains("secret"));
    }

    #[test]
    fn an_empty_token_authenticates_nobody() {
        for t in [
            AuthenticationToken::DapAuth(String::new()),
            AuthenticationToken::Bearer(String::new()),
        ] {
            assert!(!t.is_presented(Some(b""), None));
            assert!(!t.is_presented(None, Some(b"Bearer ")));
        }
    }
}
