//! What a plugin prints besides results: the error object and the VERSION answer.

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::spec::Version;

/// The error object a plugin prints on stdout when it fails (exit code 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorOutput {
    /// Spec version of the output (older plugins leave it out: empty then).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cni_version: String,
    /// The error code (see [`ErrorCode`](crate::ErrorCode)).
    pub code: u32,
    /// A short message.
    #[serde(default)]
    pub msg: String,
    /// More detail, when there is any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<String>,
}

impl ErrorOutput {
    /// The object to print for `error` in a configuration of `version`.
    ///
    /// `msg` is the error's message; `details` is the part of its cause chain that the
    /// message does not already show, or, for a delegated plugin's error, that plugin's
    /// `details`.
    pub fn from_error(error: &Error, version: Version) -> Self {
        let msg = error.to_string();
        let details = match error {
            Error::Delegate { details, .. } => details.clone(),
            _ => {
                let mut causes = Vec::new();
                let mut source = std::error::Error::source(error);
                while let Some(cause) = source {
                    let text = cause.to_string();
                    if !msg.contains(&text) {
                        causes.push(text);
                    }
                    source = cause.source();
                }
                (!causes.is_empty()).then(|| causes.join(": "))
            }
        };
        ErrorOutput {
            cni_version: version.to_string(),
            code: error.code().0,
            msg,
            details,
        }
    }
}

/// The answer to VERSION: the version of the answer and every version the plugin speaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionInfo {
    /// Spec version of the answer.
    #[serde(default)]
    pub cni_version: String,
    /// Every version the plugin speaks, as it wrote them (other plugins may list versions
    /// cnikit does not know, such as 0.1.0).
    #[serde(default)]
    pub supported_versions: Vec<String>,
}

impl VersionInfo {
    /// cnikit's answer, written in `version`: exactly [`Version::ALL`].
    pub fn ours(version: Version) -> Self {
        VersionInfo {
            cni_version: version.to_string(),
            supported_versions: Version::ALL.iter().map(|v| v.to_string()).collect(),
        }
    }

    /// Whether `version` is among the supported versions.
    pub fn supports(&self, version: Version) -> bool {
        self.supported_versions
            .iter()
            .any(|v| v == version.as_str())
    }

    /// The newest supported version that cnikit also speaks.
    pub fn newest_common(&self) -> Option<Version> {
        Version::negotiate(self.supported_versions.iter().map(String::as_str))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_output_keeps_the_delegate_details() {
        let e = Error::Delegate {
            plugin: "host-local".into(),
            code: 7,
            msg: "bad range".into(),
            details: Some("10.0.0.0/31 too small".into()),
        };
        let out = ErrorOutput::from_error(&e, Version::V1_0_0);
        assert_eq!(out.code, 7);
        assert_eq!(out.cni_version, "1.0.0");
        assert_eq!(out.details.as_deref(), Some("10.0.0.0/31 too small"));
    }

    #[test]
    fn error_output_lists_hidden_causes() {
        let e = Error::Io {
            what: "read stdin".into(),
            source: std::io::Error::other("broken pipe"),
        };
        let out = ErrorOutput::from_error(&e, Version::V1_1_0);
        assert_eq!(out.code, 5);
        assert_eq!(out.details.as_deref(), Some("broken pipe"));
    }
}
