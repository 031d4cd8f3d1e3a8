//! Validation of ZMQ endpoints and of the `--workers` list, with Dynamo 1.6.1's error wording
//! (SERVICE.md §1.1, §3.3). Validation only: connecting is the ZMQ listener's job.

use thiserror::Error;

/// Why an endpoint string is not a usable ZMQ endpoint. Display strings are Dynamo's.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EndpointError {
    #[error("invalid ZMQ endpoint `{0}`: missing scheme")]
    MissingScheme(String),
    #[error("invalid ZMQ endpoint `{0}`: unsupported scheme `{1}`")]
    UnsupportedScheme(String, String),
    #[error("invalid ZMQ endpoint `{0}`: missing TCP port")]
    MissingPort(String),
    #[error("invalid ZMQ endpoint `{0}`: missing TCP host")]
    MissingHost(String),
    #[error("invalid ZMQ endpoint `{0}`: invalid TCP port `{1}`")]
    InvalidPort(String, String),
    #[error(
        "invalid ZMQ endpoint `{0}`: IPv6 hosts must be written in brackets, e.g. tcp://[::1]:5557"
    )]
    UnbracketedIpv6(String),
    #[error("invalid ZMQ endpoint `{0}`: missing address")]
    MissingAddress(String),
}

/// Check `endpoint` the way Dynamo does: scheme `tcp`, `ipc` or `inproc`; for `tcp` a non-empty
/// host (IPv6 in brackets) and a u16 port. `tcp://*:N` passes (the listener fails later).
pub fn validate_endpoint(endpoint: &str) -> Result<(), EndpointError> {
    let e = || endpoint.to_owned();
    let Some((scheme, rest)) = endpoint.split_once("://") else {
        return Err(EndpointError::MissingScheme(e()));
    };
    match scheme {
        "tcp" => {
            // A ZMQ source address (`tcp://src;host:port`) is allowed: check the part after `;`.
            let addr = rest.rsplit_once(';').map_or(rest, |(_, a)| a);
            let (host, port) = if let Some(inner) = addr.strip_prefix('[') {
                let Some((_, after)) = inner.split_once(']') else {
                    return Err(EndpointError::MissingPort(e()));
                };
                let host_len = addr.len() - after.len();
                match after.strip_prefix(':') {
                    Some(port) => (&addr[..host_len], port),
                    None => return Err(EndpointError::MissingPort(e())),
                }
            } else {
                match addr.rsplit_once(':') {
                    Some((h, _)) if h.contains(':') => {
                        return Err(EndpointError::UnbracketedIpv6(e()))
                    }
                    Some((h, p)) => (h, p),
                    None => return Err(EndpointError::MissingPort(e())),
                }
            };
            if port.is_empty() {
                return Err(EndpointError::MissingPort(e()));
            }
            if host.is_empty() || host == "[]" {
                return Err(EndpointError::MissingHost(e()));
            }
            port.parse::<u16>()
                .map_err(|_| EndpointError::InvalidPort(e(), port.to_owned()))?;
            Ok(())
        }
        "ipc" | "inproc" => {
            if rest.is_empty() {
                Err(EndpointError::MissingAddress(e()))
            } else {
                Ok(())
            }
        }
        other => Err(EndpointError::UnsupportedScheme(e(), other.to_owned())),
    }
}

/// One entry of `--workers "id[:dp]=endpoint,..."`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSpec {
    pub instance_id: u64,
    pub dp_rank: u32,
    pub endpoint: String,
}

/// Why `--workers` could not be parsed. Display strings are Dynamo's.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WorkersArgError {
    #[error("invalid worker entry `{0}`; expected worker_id[:dp_rank]=endpoint")]
    Entry(String),
    #[error("invalid worker id in `{0}`: {1}")]
    WorkerId(String, String),
    #[error("invalid dp_rank in `{0}`: {1}")]
    DpRank(String, String),
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
}

/// Parse `--workers`; empty entries (a trailing comma) are skipped.
pub fn parse_workers(spec: &str) -> Result<Vec<WorkerSpec>, WorkersArgError> {
    let mut out = Vec::new();
    for entry in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((ids, endpoint)) = entry.split_once('=') else {
            return Err(WorkersArgError::Entry(entry.to_owned()));
        };
        let (id, dp) = match ids.split_once(':') {
            Some((id, dp)) => (id, Some(dp)),
            None => (ids, None),
        };
        let instance_id = id
            .trim()
            .parse::<u64>()
            .map_err(|e| WorkersArgError::WorkerId(entry.to_owned(), e.to_string()))?;
        let dp_rank = match dp {
            Some(dp) => dp
                .trim()
                .parse::<u32>()
                .map_err(|e| WorkersArgError::DpRank(entry.to_owned(), e.to_string()))?,
            None => 0,
        };
        let endpoint = endpoint.trim().to_owned();
        validate_endpoint(&endpoint)?;
        out.push(WorkerSpec {
            instance_id,
            dp_rank,
            endpoint,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_messages_match_dynamo() {
        assert!(validate_endpoint("tcp://127.0.0.1:5557").is_ok());
        assert!(validate_endpoint("tcp://*:5558").is_ok());
        assert!(validate_endpoint("tcp://[::1]:5557").is_ok());
        assert!(validate_endpoint("ipc:///tmp/x").is_ok());
        assert!(validate_endpoint("inproc://x").is_ok());
        assert_eq!(
            validate_endpoint("tcp://127.0.0.1")
                .unwrap_err()
                .to_string(),
            "invalid ZMQ endpoint `tcp://127.0.0.1`: missing TCP port"
        );
        assert_eq!(
            validate_endpoint("udp://127.0.0.1:5")
                .unwrap_err()
                .to_string(),
            "invalid ZMQ endpoint `udp://127.0.0.1:5`: unsupported scheme `udp`"
        );
        assert_eq!(
            validate_endpoint("nope").unwrap_err().to_string(),
            "invalid ZMQ endpoint `nope`: missing scheme"
        );
        assert!(validate_endpoint("tcp://::1:5").is_err());
        assert!(validate_endpoint("tcp://h:99999").is_err());
        assert!(validate_endpoint("tcp://:5").is_err());
    }

    #[test]
    fn workers_list_messages_match_dynamo() {
        let w = parse_workers("1=tcp://127.0.0.1:5557,2:3=tcp://h:1,").unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!((w[1].instance_id, w[1].dp_rank), (2, 3));
        assert_eq!(
            parse_workers("1").unwrap_err().to_string(),
            "invalid worker entry `1`; expected worker_id[:dp_rank]=endpoint"
        );
        assert_eq!(
            parse_workers("x=tcp://h:1").unwrap_err().to_string(),
            "invalid worker id in `x=tcp://h:1`: invalid digit found in string"
        );
        assert!(parse_workers("1:z=tcp://h:1")
            .unwrap_err()
            .to_string()
            .starts_with("invalid dp_rank in "));
        assert_eq!(
            parse_workers("1=udp://h:1").unwrap_err().to_string(),
            "invalid ZMQ endpoint `udp://h:1`: unsupported scheme `udp`"
        );
    }
}
