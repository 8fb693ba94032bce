//! `fhir-cdc replay`: project the topics again from a point in the log into the same read
//! model, until caught up. Harmless by construction: events already applied are counted as
//! duplicates and change nothing; missing ones are applied.

use std::{collections::BTreeMap, path::PathBuf, process::ExitCode};

use clap::Args;

use crate::consumer::{self, Replay, ReplayFrom};

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The projector configuration file (TOML), e.g. connectors/projector.toml.
    #[arg(long, short)]
    config: PathBuf,
    /// `earliest`; a time (RFC 3339): what was written from then on; or offsets,
    /// `TOPIC:PARTITION:OFFSET[,…]`: those partitions from there (the others not at all).
    #[arg(long, value_parser = parse_from)]
    from: ReplayFrom,
    /// Replay these topics (comma-separated or repeated) instead of the configuration's.
    #[arg(long, value_delimiter = ',')]
    topics: Vec<String>,
}

fn parse_from(text: &str) -> Result<ReplayFrom, String> {
    if text == "earliest" {
        return Ok(ReplayFrom::Earliest);
    }
    if let Ok(time) = super::parse_time(text) {
        return Ok(ReplayFrom::Time(time));
    }
    let mut offsets = BTreeMap::new();
    for place in text.split(',') {
        let mut parts = place.rsplitn(3, ':');
        let (Some(offset), Some(partition), Some(topic)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!(
                "`{place}`: write `earliest`, a time (2024-03-05T14:30:00Z) or TOPIC:PARTITION:OFFSET[,…]"
            ));
        };
        let number = |what: &str, text: &str| {
            text.parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| format!("`{place}`: the {what} is not a number"))
        };
        let partition = i32::try_from(number("partition", partition)?)
            .map_err(|_| format!("`{place}`: the partition is out of range"))?;
        offsets.insert((topic.to_owned(), partition), number("offset", offset)?);
    }
    Ok(ReplayFrom::Offsets(offsets))
}

pub async fn run(args: ReplayArgs) -> ExitCode {
    let replay = Replay {
        from: args.from,
        topics: args.topics,
    };
    super::project::with_projector("replay", &args.config, |config, shutdown| async move {
        consumer::replay(&config, shutdown, &replay).await
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_starts_at_the_beginning_a_time_or_offsets() {
        assert_eq!(parse_from("earliest").unwrap(), ReplayFrom::Earliest);
        assert!(matches!(
            parse_from("2024-03-05T14:30:00Z").unwrap(),
            ReplayFrom::Time(_)
        ));
        assert_eq!(
            parse_from("fhir.lab.Observation:0:120,fhir.lab.Patient:2:0").unwrap(),
            ReplayFrom::Offsets(BTreeMap::from([
                (("fhir.lab.Observation".to_owned(), 0), 120),
                (("fhir.lab.Patient".to_owned(), 2), 0)
            ]))
        );
        for bad in [
            "yesterday",
            "fhir.lab.Observation:0",
            "t:x:1",
            "t:0:-5",
            "t:0:1,",
        ] {
            assert!(parse_from(bad).is_err(), "{bad}");
        }
    }
}
