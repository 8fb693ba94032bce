//! Reconciliation: the source, the log and a projection compared resource by resource.
//!
//! A pass reads the mapped tables' current rows in one consistent snapshot and maps them
//! as the connector would (writing nothing), waits until the connector has captured
//! everything up to that snapshot and the projector has applied it, then compares, per
//! resource (type and id): what the source makes of it now, the latest event the log holds
//! of it (the projection's ledger, once the projector has read every topic to its end, and
//! Kafka itself for a partition the ledger does not reach back to the start of), and the
//! projection's row. Resources are compared by a digest of their content
//! (canonical JSON without `meta`); a resource the log or the projection holds a version of
//! from after the snapshot changed while the pass ran and is judged by the next pass.

pub mod events;
pub mod read;
pub mod repair;
pub mod worklist;

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    time::Duration,
};

use futures_util::{pin_mut, Stream, TryStreamExt};

use serde_json::Value as Json;
use sha2::{Digest as _, Sha256};

use crate::{
    change::Position, config::ConnectorConfig, consumer::config::ProjectorConfig, error::Error,
    mapping, pipeline,
};

/// A digest of a resource's content: SHA-256 of its canonical JSON without `meta`, cut to
/// 128 bits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest([u8; 16]);

impl Digest {
    /// The digest of `resource` (FHIR JSON): object keys sorted at every level, `meta`
    /// (versionId, lastUpdated, source) left out — it differs between every two versions.
    pub fn of(resource: &Json) -> Self {
        let mut hasher = Sha256::new();
        canonical(resource, true, &mut hasher);
        let mut digest = [0; 16];
        digest.copy_from_slice(&hasher.finalize()[..16]);
        Self(digest)
    }

    /// All 32 hex digits.
    pub fn hex(self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// The first 12 hex digits: enough to tell two apart in a report.
impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in &self.0[..6] {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

fn canonical(value: &Json, top: bool, out: &mut Sha256) {
    match value {
        Json::Object(map) => {
            let mut keys: Vec<&String> = map
                .keys()
                .filter(|k| !(top && k.as_str() == "meta"))
                .collect();
            keys.sort();
            out.update(b"{");
            for key in keys {
                out.update(serde_json::to_string(key).expect("a string serialises"));
                out.update(b":");
                canonical(&map[key], false, out);
                out.update(b",");
            }
            out.update(b"}");
        }
        Json::Array(items) => {
            out.update(b"[");
            for item in items {
                canonical(item, false, out);
                out.update(b",");
            }
            out.update(b"]");
        }
        other => out.update(other.to_string()),
    }
}

/// What the source makes of a resource now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSide {
    Resource {
        digest: Digest,
        /// The content hash of the mapping that made it.
        mapping_version: String,
    },
    /// A row of it that a mapping cannot map (it would be a dead letter).
    Unmappable { mapping_id: String },
}

/// The latest event of a resource in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    pub version: String,
    pub deleted: bool,
    /// `None` for a delete.
    pub digest: Option<Digest>,
    pub mapping_version: String,
    /// Where the event is: its id and Kafka coordinates.
    pub origin: Option<LogOrigin>,
}

/// An event's id and place in Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogOrigin {
    pub event_id: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// The projection's row of a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Projected {
    pub version: String,
    pub deleted: bool,
    pub digest: Option<Digest>,
}

/// How a resource's sides disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Drift {
    /// The source has it, the log has no live version of it: a row inserted while it was
    /// not captured (the table was not published, the stream was reset), or whose event was
    /// lost (retention).
    MissingFromLog,
    /// The log's latest version differs from what the source makes of the row now, with
    /// the same mapping: the row changed while it was not captured.
    LogBehindSource,
    /// The log's latest version was made by another version of the mapping: the mapping
    /// changed since (its new content reaches the log when the row is read again).
    MappingChanged,
    /// The log has a live version, the source no row: deleted while not captured (a
    /// TRUNCATE, a delete while the table was not published).
    DeletedAtSource,
    /// A row of it fails its mapping now (a dead letter): someone must decide.
    SourceUnmappable,
    /// The log has a live version, the projection none: its row was deleted outside the
    /// projector, or its event never applied.
    MissingFromProjection,
    /// The projection's row differs from the log's latest event at the same version, or
    /// holds a version the log does not: edited outside the projector.
    ProjectionEdited,
    /// The projection holds an older version than the log's latest, after the projector
    /// caught up.
    ProjectionBehindLog,
    /// A dead letter of the connector is outstanding, and its row has changed at the source
    /// since: the mapping maps it now, or it is gone. What the letter holds is superseded
    /// (the row's current state is what the other classes judge); it needs settling, not
    /// replaying.
    DeadLetterOutdated,
}

impl Drift {
    pub const ALL: [Drift; 9] = [
        Drift::MissingFromLog,
        Drift::LogBehindSource,
        Drift::MappingChanged,
        Drift::DeletedAtSource,
        Drift::SourceUnmappable,
        Drift::MissingFromProjection,
        Drift::ProjectionEdited,
        Drift::ProjectionBehindLog,
        Drift::DeadLetterOutdated,
    ];

    /// The class's name in reports, events and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Drift::MissingFromLog => "missing_from_log",
            Drift::LogBehindSource => "log_behind_source",
            Drift::MappingChanged => "mapping_changed",
            Drift::DeletedAtSource => "deleted_at_source",
            Drift::SourceUnmappable => "source_unmappable",
            Drift::MissingFromProjection => "missing_from_projection",
            Drift::ProjectionEdited => "projection_edited",
            Drift::ProjectionBehindLog => "projection_behind_log",
            Drift::DeadLetterOutdated => "dead_letter_outdated",
        }
    }
}

/// One resource's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Agree,
    /// The log or the projection holds a version from after the source was read.
    ChangedSince,
    Drift(Drift),
}

/// Judge one resource from its three sides. `read_at` is the sort key of the source read's
/// position ([`crate::change::Position::sort_key`]): a version at or after it changed
/// while the pass ran. The source side is judged first: its repair (reading the row again)
/// also brings the projection along.
pub fn judge(
    source: Option<&SourceSide>,
    log: Option<&Logged>,
    projection: Option<&Projected>,
    read_at: &str,
) -> Verdict {
    let since = |version: &str| version >= read_at;
    if log.is_some_and(|l| since(&l.version)) || projection.is_some_and(|p| since(&p.version)) {
        return Verdict::ChangedSince;
    }
    let live = log.filter(|l| !l.deleted);
    let source_drift = match (source, live) {
        (Some(SourceSide::Unmappable { .. }), _) => Some(Drift::SourceUnmappable),
        (Some(SourceSide::Resource { .. }), None) => Some(Drift::MissingFromLog),
        (None, Some(_)) => Some(Drift::DeletedAtSource),
        (
            Some(SourceSide::Resource {
                digest,
                mapping_version,
            }),
            Some(logged),
        ) if logged.digest != Some(*digest) => {
            Some(if logged.mapping_version != *mapping_version {
                Drift::MappingChanged
            } else {
                Drift::LogBehindSource
            })
        }
        _ => None,
    };
    if let Some(drift) = source_drift {
        return Verdict::Drift(drift);
    }
    let projection_drift = match (log, projection) {
        (None, None) => None,
        (Some(logged), None) => (!logged.deleted).then_some(Drift::MissingFromProjection),
        (None, Some(_)) => Some(Drift::ProjectionEdited),
        (Some(logged), Some(row)) if row.version < logged.version => {
            Some(Drift::ProjectionBehindLog)
        }
        (Some(logged), Some(row)) => (row.version != logged.version
            || row.deleted != logged.deleted
            || row.digest != logged.digest)
            .then_some(Drift::ProjectionEdited),
    };
    projection_drift.map_or(Verdict::Agree, Verdict::Drift)
}

/// What a pass found.
#[derive(Debug)]
pub struct Report {
    /// The source read's position: no change after it is in what was read.
    pub read_at: Position,
    pub rows: u64,
    /// Resources compared (on any side).
    pub compared: usize,
    /// Resources changed while the pass ran, left to the next.
    pub changed_since: usize,
    /// Every drifted resource, by class then key, with its sides as text.
    pub drifted: Vec<Drifted>,
    /// Rows a mapping cannot map whose resource no side has: their table, mapping, count.
    pub unmappable_rows: BTreeMap<(String, String), usize>,
    /// Outstanding dead letters whose row cannot be told: their id, and why.
    pub letters_untold: Vec<(String, String)>,
    /// Where the log side came from.
    pub log: read::LogRead,
    /// How long the connector, then the projector, took to catch up with the source read.
    pub waited: (Duration, Duration),
    /// The tables compared (`schema.table`).
    pub tables: Vec<String>,
}

/// A drifted resource and its sides.
#[derive(Debug, Clone, PartialEq)]
pub struct Drifted {
    pub class: Drift,
    pub resource_type: String,
    pub resource_id: String,
    pub source: Option<SourceSide>,
    pub log: Option<Logged>,
    pub projection: Option<Projected>,
    /// The source row it is made of: its table (`schema.table`) and key values.
    pub row: Option<read::SourceRow>,
    /// The table it comes from (the source row's, or the logged event's).
    pub table: Option<String>,
    /// The dead letter it is about (`dead_letter_outdated`): its id. Its resource is the
    /// one the row makes now, or empty when the row makes none.
    pub letter: Option<String>,
}

impl Drifted {
    /// What it is about: a resource, or a dead letter (and the resource its row makes).
    pub fn subject(&self) -> (&str, &str, &str) {
        (
            &self.resource_type,
            &self.resource_id,
            self.letter.as_deref().unwrap_or_default(),
        )
    }

    /// The three sides as a report shows them: `<digest>`, `<version> <digest>`,
    /// `<version> deleted`, `fails mapping <id>` or `none`.
    pub fn sides(&self) -> [String; 3] {
        let side = |version: &str, deleted: bool, digest: Option<Digest>| match (deleted, digest) {
            (false, Some(digest)) => format!("{version} {digest}"),
            _ => format!("{version} deleted"),
        };
        [
            match &self.source {
                None => "none".into(),
                Some(SourceSide::Resource { digest, .. }) => digest.to_string(),
                Some(SourceSide::Unmappable { mapping_id }) => {
                    format!("fails mapping {mapping_id}")
                }
            },
            self.log
                .as_ref()
                .map_or("none".into(), |l| side(&l.version, l.deleted, l.digest)),
            self.projection
                .as_ref()
                .map_or("none".into(), |p| side(&p.version, p.deleted, p.digest)),
        ]
    }
}

impl Report {
    /// Drifted resources per class (every class, zero included).
    pub fn counts(&self) -> BTreeMap<Drift, usize> {
        let mut counts: BTreeMap<Drift, usize> = Drift::ALL.iter().map(|d| (*d, 0)).collect();
        for drifted in &self.drifted {
            *counts.entry(drifted.class).or_default() += 1;
        }
        counts
    }

    /// Drifted resources per class and table (rows failing their mapping included).
    fn counts_by_table(&self) -> BTreeMap<(Drift, &str), usize> {
        let mut counts = BTreeMap::new();
        for drifted in &self.drifted {
            let table = drifted.table.as_deref().unwrap_or_default();
            *counts.entry((drifted.class, table)).or_default() += 1;
        }
        for ((table, _), rows) in &self.unmappable_rows {
            *counts
                .entry((Drift::SourceUnmappable, table.as_str()))
                .or_default() += rows;
        }
        counts
    }

    /// For every table compared and every drift class, its name and how many drifted (zeros
    /// included, so that a gauge falls back to 0).
    pub fn drift_by_table(&self) -> Vec<(&str, &'static str, usize)> {
        let counts = self.counts_by_table();
        self.tables
            .iter()
            .flat_map(|table| {
                let counts = &counts;
                Drift::ALL.into_iter().map(move |class| {
                    let n = counts.get(&(class, table.as_str())).copied().unwrap_or(0);
                    (table.as_str(), class.name(), n)
                })
            })
            .collect()
    }

    /// Drifted resources, and rows failing their mapping without a resource.
    pub fn drift(&self) -> usize {
        self.drifted.len() + self.unmappable_rows.values().sum::<usize>()
    }
}

/// Why a pass could not judge.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// The configuration or the command line: exit 2.
    #[error("{0}")]
    Usage(String),
    /// The connector or the projector stayed behind the source read longer than the bound
    /// (lag beyond its bound counts as drift): exit 1.
    #[error("{0}")]
    Lag(#[source] Error),
    /// A system could not be read: exit 1.
    #[error("{0}")]
    Failed(#[source] Error),
}

/// The pass's inputs.
#[derive(Debug)]
pub struct Pass<'a> {
    pub connector: &'a ConnectorConfig,
    pub projector: &'a ProjectorConfig,
    /// Only this mapped table (`schema.table`).
    pub table: Option<&'a str>,
    /// How long the connector and the projector may take to catch up with the source read.
    pub lag_bound: Duration,
}

impl Pass<'_> {
    /// Read the three sides and judge every resource; when something drifted, read them
    /// again and report only what drifted both times, in the same class. A commit that
    /// races the snapshot's start (its WAL written before the read's position, its
    /// visibility after) can make a resource look drifted once; real drift stays.
    pub async fn run(&self) -> Result<Report, PassError> {
        let first = self.judge().await?;
        if first.drift() == 0 {
            return Ok(first);
        }
        let mut second = self.judge().await?;
        let seen: HashSet<(Drift, (&str, &str, &str))> = first
            .drifted
            .iter()
            .map(|d| (d.class, d.subject()))
            .collect();
        let before = second.drifted.len();
        second
            .drifted
            .retain(|d| seen.contains(&(d.class, d.subject())));
        second.changed_since += before - second.drifted.len();
        second
            .unmappable_rows
            .retain(|key, _| first.unmappable_rows.contains_key(key));
        Ok(second)
    }

    /// One reading of the three sides, judged.
    async fn judge(&self) -> Result<Report, PassError> {
        let usage = |e: &dyn fmt::Display| PassError::Usage(e.to_string());
        let failed = PassError::Failed;
        let config = self.connector;
        let mappings_config = config
            .mappings
            .as_ref()
            .ok_or_else(|| usage(&"the connector configuration has no [mappings]"))?;
        let mappings = mapping::load_dir(&mappings_config.path).map_err(|e| usage(&e))?;
        let mut tables = mapping::source_tables(&mappings);
        if let Some(only) = self.table {
            tables.retain(|(schema, table)| format!("{schema}.{table}") == only);
            if tables.is_empty() {
                return Err(usage(&format!(
                    "no mapping reads table `{only}` (write it as schema.table)"
                )));
            }
            // The tables its lookups read are read first, in the same snapshot.
            tables = mapping::with_lookups(&mappings, tables.into_iter().collect());
        }
        let topics: Vec<String> = pipeline::topic_specs(config, &mappings)
            .into_iter()
            .map(|spec| spec.name)
            .filter(|name| *name != config.dead_letter_topic())
            .collect();
        let mapper = pipeline::mapper_for(config, mappings).map_err(|e| usage(&e))?;
        let client = crate::postgres::connect(&self.projector.projection.url)
            .await
            .map_err(|e| failed(Error::of("the projection database", e)))?;

        let letters = read::Letters::outstanding(config, &tables)
            .await
            .map_err(failed)?;
        let source = read::source(config, &mapper, &tables, letters, &client)
            .await
            .map_err(failed)?;
        let high = source.high.clone().expect("a read has its position");
        let connector_wait = read::connector_caught_up(config, &high, self.lag_bound)
            .await
            .map_err(PassError::Lag)?;
        let projector_wait =
            read::projector_caught_up(self.projector, &client, &topics, self.lag_bound)
                .await
                .map_err(PassError::Lag)?;
        let log = read::log(self.projector, &client, &topics)
            .await
            .map_err(failed)?;
        let only: Option<Vec<String>> = self.table.map(|t| vec![t.to_owned()]);
        let sides = read::sides(
            &client,
            &self.projector.projection.schema,
            &config.name,
            only.as_deref(),
        )
        .await
        .map_err(failed)?;
        let tables = tables.iter().map(|(s, t)| format!("{s}.{t}")).collect();
        compare(source, log, sides, (connector_wait, projector_wait), tables)
            .await
            .map_err(failed)
    }
}

/// Judge every resource any side has, one at a time as the sides come.
async fn compare(
    source: read::SourceRead,
    log: read::LogRead,
    sides: impl Stream<Item = Result<read::Sides, Error>>,
    waited: (Duration, Duration),
    tables: Vec<String>,
) -> Result<Report, Error> {
    let at = source
        .low
        .as_ref()
        .expect("a read has its position")
        .sort_key();
    let read_at = source.high.clone().expect("a read has its position");
    let mut unmatched = source.unmappable.clone();
    let (mut drifted, mut changed_since, mut compared) = (Vec::new(), 0, 0);
    pin_mut!(sides);
    while let Some(sides) = sides.try_next().await? {
        compared += 1;
        let logged = sides.logged.as_ref();
        // A resource the log has, whose row fails its mapping now: that, not a deletion.
        let failing = logged
            .and_then(|(_, row)| source.unmappable.get(row))
            .map(|mapping_id| SourceSide::Unmappable {
                mapping_id: mapping_id.clone(),
            });
        if let Some((_, row)) = logged.filter(|_| failing.is_some()) {
            unmatched.remove(row);
        }
        let sourced = sides.source.as_ref();
        let source_side = sourced.map(|(side, _)| side).or(failing.as_ref());
        let (log, row) = (logged.map(|(l, _)| l), sides.projected.as_ref());
        match judge(source_side, log, row, &at) {
            Verdict::Agree => {}
            Verdict::ChangedSince => changed_since += 1,
            Verdict::Drift(class) => drifted.push(Drifted {
                class,
                source: source_side.cloned(),
                log: log.cloned(),
                projection: row.cloned(),
                row: sourced.map(|(_, row)| row.clone()),
                table: sourced
                    .map(|(_, (table, _))| table.clone())
                    .or_else(|| logged.map(|(_, (table, _))| table.clone())),
                resource_type: sides.key.0,
                resource_id: sides.key.1,
                letter: None,
            }),
        }
    }
    for letter in source.letters.outdated(&at) {
        let (resource, side) = letter.now.clone().flatten().unzip();
        let (resource_type, resource_id) = resource.unwrap_or_default();
        drifted.push(Drifted {
            class: Drift::DeadLetterOutdated,
            resource_type,
            resource_id,
            source: side,
            log: None,
            projection: None,
            row: None,
            table: Some(letter.table),
            letter: Some(letter.id),
        });
    }
    drifted.sort_by(|a, b| (a.class, a.subject()).cmp(&(b.class, b.subject())));
    let mut unmappable_rows = BTreeMap::new();
    for ((table, _), mapping_id) in unmatched {
        *unmappable_rows.entry((table, mapping_id)).or_default() += 1;
    }
    Ok(Report {
        read_at,
        rows: source.read,
        compared,
        changed_since,
        drifted,
        unmappable_rows,
        letters_untold: source.letters.untold,
        log,
        waited,
        tables,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_digest_ignores_meta_and_key_order_but_not_content() {
        let a = json!({"resourceType": "Observation", "id": "1", "meta": {"versionId": "7"},
                       "valueQuantity": {"value": 4.50, "unit": "mmol/L"}});
        let b = json!({"valueQuantity": {"unit": "mmol/L", "value": 4.50}, "id": "1",
                       "meta": {"versionId": "9"}, "resourceType": "Observation"});
        assert_eq!(Digest::of(&a), Digest::of(&b));
        let c = json!({"resourceType": "Observation", "id": "1",
                       "valueQuantity": {"value": 4.51, "unit": "mmol/L"}});
        assert_ne!(Digest::of(&a), Digest::of(&c));
        // Only the resource's own meta is left out.
        let nested = |v: &str| json!({"contained": [{"meta": {"versionId": v}}]});
        assert_ne!(Digest::of(&nested("1")), Digest::of(&nested("2")));
    }

    fn resource(n: u8, mapping: &str) -> SourceSide {
        SourceSide::Resource {
            digest: Digest([n; 16]),
            mapping_version: mapping.into(),
        }
    }

    fn logged(version: &str, n: Option<u8>, mapping: &str) -> Logged {
        Logged {
            version: version.into(),
            deleted: n.is_none(),
            digest: n.map(|n| Digest([n; 16])),
            mapping_version: mapping.into(),
            origin: None,
        }
    }

    fn row(version: &str, n: Option<u8>) -> Projected {
        Projected {
            version: version.into(),
            deleted: n.is_none(),
            digest: n.map(|n| Digest([n; 16])),
        }
    }

    #[test]
    fn every_class_is_told_apart() {
        fn judge(s: Option<&SourceSide>, l: Option<&Logged>, p: Option<&Projected>) -> Verdict {
            super::judge(s, l, p, "0000000000000500")
        }
        fn drift(s: Option<&SourceSide>, l: Option<&Logged>, p: Option<&Projected>) -> Drift {
            match judge(s, l, p) {
                Verdict::Drift(d) => d,
                other => panic!("{other:?}"),
            }
        }
        let (src, log, proj) = (
            resource(1, "m1"),
            logged("0000000000000100.0000000000", Some(1), "m1"),
            row("0000000000000100.0000000000", Some(1)),
        );
        assert_eq!(judge(Some(&src), Some(&log), Some(&proj)), Verdict::Agree);
        assert_eq!(judge(None, None, None), Verdict::Agree);
        // Deleted everywhere: the tombstone agrees with the source's absence.
        assert_eq!(
            judge(
                None,
                Some(&logged("0000000000000100.0000000000", None, "m1")),
                Some(&row("0000000000000100.0000000000", None))
            ),
            Verdict::Agree
        );
        assert_eq!(drift(Some(&src), None, None), Drift::MissingFromLog);
        assert_eq!(
            drift(
                Some(&src),
                Some(&logged("0000000000000100.0000000000", None, "m1")),
                Some(&row("0000000000000100.0000000000", None))
            ),
            Drift::MissingFromLog
        );
        assert_eq!(
            drift(Some(&resource(2, "m1")), Some(&log), Some(&proj)),
            Drift::LogBehindSource
        );
        assert_eq!(
            drift(Some(&resource(2, "m2")), Some(&log), Some(&proj)),
            Drift::MappingChanged
        );
        assert_eq!(drift(None, Some(&log), Some(&proj)), Drift::DeletedAtSource);
        let failing = SourceSide::Unmappable {
            mapping_id: "lab.result".into(),
        };
        assert_eq!(
            drift(Some(&failing), Some(&log), Some(&proj)),
            Drift::SourceUnmappable
        );
        assert_eq!(
            drift(Some(&src), Some(&log), None),
            Drift::MissingFromProjection
        );
        assert_eq!(
            drift(
                Some(&src),
                Some(&log),
                Some(&row("0000000000000100.0000000000", Some(9)))
            ),
            Drift::ProjectionEdited
        );
        assert_eq!(drift(None, None, Some(&proj)), Drift::ProjectionEdited);
        assert_eq!(
            drift(
                Some(&src),
                Some(&log),
                Some(&row("0000000000000050.0000000000", Some(1)))
            ),
            Drift::ProjectionBehindLog
        );
        // A version from after the read: judged next time, whatever the sides say.
        assert_eq!(
            judge(
                None,
                Some(&logged("0000000000000600.0000000001", Some(3), "m1")),
                None
            ),
            Verdict::ChangedSince
        );
        assert_eq!(
            judge(
                Some(&src),
                Some(&log),
                Some(&row("0000000000000500.0000000000", Some(4)))
            ),
            Verdict::ChangedSince
        );
    }
}
