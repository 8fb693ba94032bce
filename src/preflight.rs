//! Pre-flight findings: what `fhir-cdc check` learned about each system a connector talks to,
//! in words a DBA or platform engineer can act on.
//!
//! Each component's checks live next to its client (`source::postgres::preflight`,
//! `source::mysql::preflight`, `kafka`, `canonical::registry`); they return
//! [`Finding`]s and never print. Findings never contain row values or credentials.

use std::{error::Error as StdError, fmt, io};

/// How a finding affects whether the connector can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The prerequisite holds.
    Ok,
    /// The connector can run, with a limitation worth knowing.
    Warning,
    /// The connector cannot run until this is fixed.
    Problem,
}

/// One checked fact about one component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub component: &'static str,
    pub severity: Severity,
    /// What was found.
    pub summary: String,
    /// What to do about it, for warnings and problems.
    pub fix: Option<String>,
}

impl Finding {
    pub fn ok(component: &'static str, summary: impl Into<String>) -> Self {
        Self {
            component,
            severity: Severity::Ok,
            summary: summary.into(),
            fix: None,
        }
    }

    pub fn warning(
        component: &'static str,
        summary: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            component,
            severity: Severity::Warning,
            summary: summary.into(),
            fix: Some(fix.into()),
        }
    }

    pub fn problem(
        component: &'static str,
        summary: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            component,
            severity: Severity::Problem,
            summary: summary.into(),
            fix: Some(fix.into()),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.severity {
            Severity::Ok => "ok  ",
            Severity::Warning => "WARN",
            Severity::Problem => "FAIL",
        };
        write!(f, "{tag}  {:<9} {}", self.component, self.summary)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n      {:<9} fix: {fix}", "")?;
        }
        Ok(())
    }
}

/// Explain a failure to reach `what` at `address` from the I/O error somewhere in `err`'s
/// source chain: the summary and the fix. `None` when the chain holds no I/O error.
pub fn unreachable(
    component: &'static str,
    what: &str,
    address: &str,
    err: &(dyn StdError + 'static),
) -> Option<Finding> {
    let io_err = source_chain(err).find_map(|e| e.downcast_ref::<io::Error>())?;
    let text = io_err.to_string();
    let (summary, fix) = match io_err.kind() {
        io::ErrorKind::ConnectionRefused => (
            format!("nothing is listening at {address} (connection refused)"),
            format!("start {what}, or correct the host/port in the configuration"),
        ),
        io::ErrorKind::TimedOut => (
            format!("no answer from {address} in time"),
            format!("check that {what} runs and that no firewall drops the traffic"),
        ),
        _ if text.contains("lookup")
            || text.contains("resolve")
            || text.contains("Name or service") =>
        {
            (
                format!("the host of {address} cannot be resolved"),
                "correct the host name, or check DNS on this machine".to_owned(),
            )
        }
        _ => (
            format!("cannot reach {address}: {text}"),
            format!("check that {what} runs and is reachable"),
        ),
    };
    Some(Finding::problem(component, summary, fix))
}

fn source_chain<'a>(
    err: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(err), |e: &&'a (dyn StdError + 'static)| (*e).source())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapper(io::Error);
    impl fmt::Display for Wrapper {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("client error")
        }
    }
    impl StdError for Wrapper {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn refused_connections_say_nothing_listens_and_how_to_fix_it() {
        let err = Wrapper(io::Error::from(io::ErrorKind::ConnectionRefused));
        let finding = unreachable("kafka", "the Kafka broker", "127.0.0.1:1", &err).unwrap();
        assert_eq!(finding.severity, Severity::Problem);
        assert!(finding
            .summary
            .contains("nothing is listening at 127.0.0.1:1"));
        assert!(finding.fix.unwrap().contains("start the Kafka broker"));
    }

    #[test]
    fn errors_without_io_cause_are_left_to_the_caller() {
        let err = io::Error::other("x");
        let plain: &(dyn StdError + 'static) = &fmt::Error;
        assert!(unreachable("x", "x", "x", plain).is_none());
        assert!(unreachable("x", "x", "x", &err).is_some());
    }
}
