//! `fhir-cdc schemas`: the Avro schemas of canonical events, generated and checked in.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use clap::{Args, Subcommand};

use crate::{canonical::schema, mapping};

#[derive(Debug, Args)]
pub struct SchemasArgs {
    #[command(subcommand)]
    command: SchemasCommand,
}

#[derive(Debug, Subcommand)]
enum SchemasCommand {
    /// Write the schema of every resource type the mappings produce to DIR/<Type>.avsc,
    /// removing schemas no mapping needs any more.
    Generate(Paths),
    /// Fail when the checked-in schemas differ from what `generate` would write, or when a
    /// schema changed in a way that is not BACKWARD compatible with the version on a
    /// git revision (default: main).
    Check {
        #[command(flatten)]
        paths: Paths,
        /// The git revision holding the previous schemas.
        #[arg(long, default_value = "main")]
        against: String,
    },
}

#[derive(Debug, Args)]
struct Paths {
    /// The mapping files (searched recursively).
    #[arg(long, default_value = "mappings")]
    mappings: PathBuf,
    /// The schema directory.
    #[arg(long, default_value = "schemas")]
    dir: PathBuf,
}

pub fn run(args: SchemasArgs) -> ExitCode {
    match args.command {
        SchemasCommand::Generate(paths) => generate(&paths),
        SchemasCommand::Check { paths, against } => check(&paths, &against),
    }
}

/// The schema files the mappings call for, or the mapping errors.
fn wanted(paths: &Paths) -> Option<std::collections::BTreeMap<String, String>> {
    match mapping::load_dir(&paths.mappings) {
        Ok(mappings) => {
            let types: BTreeSet<&str> = mappings
                .iter()
                .flat_map(|m| &m.resources)
                .map(|r| r.resource_type.as_str())
                .collect();
            Some(schema::schema_files(types))
        }
        Err(errors) => {
            println!("{errors}");
            println!("fix the mappings first: the schemas follow from them");
            None
        }
    }
}

fn existing(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".avsc"))
        .collect()
}

fn generate(paths: &Paths) -> ExitCode {
    let Some(files) = wanted(paths) else {
        return ExitCode::FAILURE;
    };
    if let Err(e) = std::fs::create_dir_all(&paths.dir) {
        println!("cannot create {}: {e}", paths.dir.display());
        return ExitCode::FAILURE;
    }
    for stale in existing(&paths.dir)
        .iter()
        .filter(|name| !files.contains_key(*name))
    {
        let path = paths.dir.join(stale);
        if let Err(e) = std::fs::remove_file(&path) {
            println!("cannot remove {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("removed {}", path.display());
    }
    for (name, content) in &files {
        let path = paths.dir.join(name);
        if let Err(e) = std::fs::write(&path, content) {
            println!("cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}

fn check(paths: &Paths, against: &str) -> ExitCode {
    let Some(files) = wanted(paths) else {
        return ExitCode::FAILURE;
    };
    let mut problems = 0;
    for stale in existing(&paths.dir)
        .iter()
        .filter(|name| !files.contains_key(*name))
    {
        println!(
            "FAIL  {}: no mapping produces this resource type any more",
            paths.dir.join(stale).display()
        );
        problems += 1;
    }
    for (name, content) in &files {
        let path = paths.dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(on_disk) if on_disk == *content => {}
            Ok(_) => {
                println!(
                    "FAIL  {}: differs from what the definitions and mappings generate",
                    path.display()
                );
                problems += 1;
            }
            Err(_) => {
                println!("FAIL  {}: missing", path.display());
                problems += 1;
            }
        }
        match previous(against, &path) {
            Some(old) => match schema::backward_compatible(&old, content) {
                Ok(()) => println!(
                    "ok    {}: BACKWARD compatible with {against}",
                    path.display()
                ),
                Err(e) => {
                    println!(
                        "FAIL  {}: not BACKWARD compatible with {against}: {e}",
                        path.display()
                    );
                    problems += 1;
                }
            },
            None => println!(
                "ok    {}: new since {against} (nothing to compare)",
                path.display()
            ),
        }
    }
    if problems == 0 {
        println!("{} schema(s) up to date", files.len());
        ExitCode::SUCCESS
    } else {
        println!("{problems} problem(s); run `fhir-cdc schemas generate` and review the diff");
        ExitCode::FAILURE
    }
}

/// The file's content at a git revision, if there is one.
fn previous(revision: &str, path: &Path) -> Option<String> {
    let output = Command::new("git")
        .arg("show")
        .arg(format!("{revision}:./{}", path.display()))
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8(output.stdout).ok())
        .flatten()
}
