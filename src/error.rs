//! What the error policy reads: an error's [`Kind`], never its text. [`Error`] carries a
//! kind, what was being done, and the cause — like `std::io::Error` — for the paths that
//! talk to a database, Kafka or the registry and have no enum of their own. Module errors
//! with an enum (Kafka's `Error`, the registry's `CodecError`, …) say their kind
//! through [`Kinded`], which also lets [`Error::of`] take the cause's kind.
//!
//! Messages name the place and the fix, never a secret or a row's value.

use std::{borrow::Cow, fmt};

/// What can be done about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Trying again later may succeed: a server unreachable, restarting, timing out, short
    /// of resources.
    Transient,
    /// It stays so until someone looks: data a database refuses, a missing item, a bug.
    Definite,
    /// The configuration, the database's setup or privileges: it stays so until someone
    /// changes them. The message names the fix.
    Configuration,
    /// Another instance took over (a Kafka transactional producer fenced): this one stops.
    Fenced,
}

impl Kind {
    /// Every kind, in declaration order.
    pub const ALL: [Kind; 4] = [
        Kind::Transient,
        Kind::Definite,
        Kind::Configuration,
        Kind::Fenced,
    ];

    /// Its name, as health answers and logs say it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Transient => "transient",
            Kind::Definite => "definite",
            Kind::Configuration => "configuration",
            Kind::Fenced => "fenced",
        }
    }
}

/// An error that knows its kind.
pub trait Kinded {
    fn kind(&self) -> Kind;
}

type Cause = Box<dyn std::error::Error + Send + Sync>;

/// A failure while doing something, with its kind and cause.
#[derive(Debug)]
pub struct Error {
    kind: Kind,
    /// What was being done ("reading the worklist"); empty when the cause says it all.
    doing: Cow<'static, str>,
    cause: Option<Cause>,
}

impl Error {
    /// A failure without a cause: `message` says it all.
    pub fn new(kind: Kind, message: impl Into<Cow<'static, str>>) -> Self {
        Error {
            kind,
            doing: message.into(),
            cause: None,
        }
    }

    /// `cause` while `doing`, of the cause's kind.
    pub fn of<E>(doing: impl Into<Cow<'static, str>>, cause: E) -> Self
    where
        E: Kinded + std::error::Error + Send + Sync + 'static,
    {
        Error {
            kind: cause.kind(),
            doing: doing.into(),
            cause: Some(Box::new(cause)),
        }
    }

    /// `cause` while `doing`, of `kind` (for a cause that does not know its kind).
    pub fn caused<E>(kind: Kind, doing: impl Into<Cow<'static, str>>, cause: E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        Error {
            kind,
            doing: doing.into(),
            cause: Some(Box::new(cause)),
        }
    }

    /// A function making [`Error::of`] with `doing`, for `map_err`.
    pub fn while_<E>(doing: &'static str) -> impl Fn(E) -> Self + Copy
    where
        E: Kinded + std::error::Error + Send + Sync + 'static,
    {
        move |cause| Self::of(doing, cause)
    }

    /// `cause`, of its kind, its message as it is.
    pub fn bare<E>(cause: E) -> Self
    where
        E: Kinded + std::error::Error + Send + Sync + 'static,
    {
        Self::of("", cause)
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn is_transient(&self) -> bool {
        self.kind == Kind::Transient
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.cause, self.doing.is_empty()) {
            (Some(cause), true) => write!(f, "{cause}"),
            (Some(cause), false) => write!(f, "{}: {cause}", self.doing),
            (None, _) => f.write_str(&self.doing),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_deref()
            .map(|c| c as &(dyn std::error::Error + 'static))
    }
}

impl Kinded for Error {
    fn kind(&self) -> Kind {
        self.kind
    }
}

/// A database's refusal that may pass: a serialization failure or deadlock, a lock or
/// statement timeout, a lack of resources, a lost connection. Everything else it says
/// (a constraint, a missing table or privilege) stays.
impl Kinded for tokio_postgres::Error {
    fn kind(&self) -> Kind {
        let io = std::error::Error::source(self).is_some_and(|s| s.is::<std::io::Error>());
        let code = self.code().map(tokio_postgres::error::SqlState::code);
        let passes = |code: &str| {
            matches!(
                code,
                "40001" | "40P01" | "55P03" | "57014" | "57P01" | "57P02" | "57P03"
            ) || code.starts_with("53")
                || code.starts_with("08")
        };
        match code {
            _ if self.is_closed() || io => Kind::Transient,
            Some(code) if passes(code) => Kind::Transient,
            Some(code) if code.starts_with("28") || code == "42501" => Kind::Configuration,
            _ => Kind::Definite,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("the server went away")]
    struct Gone;

    impl Kinded for Gone {
        fn kind(&self) -> Kind {
            Kind::Transient
        }
    }

    #[test]
    fn an_error_says_what_was_done_takes_its_causes_kind_and_keeps_the_cause() {
        let e = Error::of("reading the worklist", Gone);
        assert_eq!(e.to_string(), "reading the worklist: the server went away");
        assert!(e.is_transient());
        assert_eq!(
            std::error::Error::source(&e).map(ToString::to_string),
            Some("the server went away".to_owned())
        );
        assert_eq!(Error::bare(Gone).to_string(), "the server went away");
        let missing = Error::new(Kind::Definite, "no worklist item 7");
        assert_eq!(missing.to_string(), "no worklist item 7");
        assert_eq!(missing.kind(), Kind::Definite);
        assert!(std::error::Error::source(&missing).is_none());
    }
}
