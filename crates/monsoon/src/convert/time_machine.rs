//! Time machines (`time-machine-namespaces`, `-index-prefix`, `-index-suffix`,
//! `-direct-reads`): `spec.timeMachine`.
//!
//! Monstache logs a change when its namespace is listed exactly (`db.collection`), into
//! `<prefix>.<index>.<suffix>` lower-cased, the suffix a Go time layout. The layout's date
//! parts become monsoon's `%` directives; parts monsoon does not write (names of months and
//! days, minutes, seconds, zones, unpadded numbers) are refused with the fix.

use monsoon_api::{SyncPipelineSpec, TimeMachine};
use toml::Table;

use super::namespaces::Membership;
use super::{boolean, string, strings, Error, Notes};

const NAMESPACES: &str = "time-machine-namespaces";
const PREFIX: &str = "time-machine-index-prefix";
const SUFFIX: &str = "time-machine-index-suffix";
const DIRECT_READS: &str = "time-machine-direct-reads";

/// The time machine options into `spec`.
pub(super) fn convert(table: &Table, membership: &Membership, spec: &mut SyncPipelineSpec, notes: &mut Notes) -> Result<(), Error> {
    let listed = strings(table, NAMESPACES)?;
    let prefix = string(table, PREFIX)?.filter(|p| !p.is_empty());
    let suffix = string(table, SUFFIX)?.filter(|s| !s.is_empty());
    let direct_reads = boolean(table, DIRECT_READS)? == Some(true);
    let mut namespaces = Vec::new();
    for ns in listed {
        if !ns.contains('.') {
            return Err(Error::unusable(NAMESPACES, format!("`{ns}` names no collection: Monstache logs only namespaces listed as `db.collection`, so it never logged anything for it; write `<database>.{ns}` or remove it")));
        }
        if !membership.includes(&ns) {
            notes.add(NAMESPACES, format!("`{ns}` left out: the pipeline does not sync it, so Monstache never logged its changes either"));
            continue;
        }
        if !namespaces.contains(&ns) {
            namespaces.push(ns);
        }
    }
    if namespaces.is_empty() {
        for key in [PREFIX, SUFFIX, DIRECT_READS] {
            if table.contains_key(key) {
                notes.add(key, "ignored: no synced `time-machine-namespaces`");
            }
        }
        return Ok(());
    }
    let mut tm = TimeMachine { namespaces, ..TimeMachine::default() };
    if let Some(prefix) = prefix {
        // Monstache lower-cases the whole index name.
        let lower = prefix.to_lowercase();
        if let Err(why) = monsoon_api::check_index_name(&lower) {
            return Err(Error::unusable(PREFIX, format!("`{prefix}` cannot start an index name: it {why}")));
        }
        tm.index_prefix = lower;
    }
    if let Some(layout) = suffix {
        tm.index_suffix = date_format(&layout)?;
        monsoon_api::shape::DateFormat::parse(&tm.index_suffix).map_err(|why| Error::unusable(SUFFIX, format!("`{layout}` cannot end an index name: {why}")))?;
        notes.add(SUFFIX, format!("`indexSuffix: \"{}\"` (monsoon's date format for the Go layout `{layout}`)", tm.index_suffix));
    }
    if direct_reads {
        if spec.snapshot {
            tm.snapshot = true;
        } else {
            notes.add(DIRECT_READS, "ignored: there are no `direct-read-namespaces`");
        }
    }
    notes.add(
        NAMESPACES,
        "`timeMachine`: each entry is dated by its change's time (Monstache: the moment it indexed it) and has an `_id` of its own (the MongoDB `_id` and the change's time, Monstache: a random one), so a replay after a crash adds no second entry; deletes are not logged, as in Monstache",
    );
    if boolean(table, "index-oplog-time")? != Some(true) && (table.contains_key("oplog-ts-field-name") || table.contains_key("oplog-date-field-name")) {
        notes.add(NAMESPACES, "log entries carry the change's time as `oplog_ts` and `oplog_date` (Monstache names them after `oplog-ts-field-name`/`oplog-date-field-name`); set `oplogTime` on the namespace's mapping to choose the names");
    }
    spec.time_machine = Some(tm);
    Ok(())
}

/// A Go time layout (`2006-01-02`) as monsoon's date format (`%Y-%m-%d`), reading the layout
/// the way Go's `time.Format` does; text is lower-cased (Monstache lower-cases the index name).
///
/// # Errors
/// A layout part monsoon does not write, named with the fix.
fn date_format(layout: &str) -> Result<String, Error> {
    let b = layout.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    let refuse = |part: &str, what: &str| {
        Err(Error::unusable(
            SUFFIX,
            format!("`{part}` in `{layout}` ({what}) has no equivalent in monsoon's index dates; use the layout's 2006, 06, 01, 02, 002 and 15 (year, two-digit year, month, day, day of the year, hour), or set `timeMachine.indexSuffix` with %Y %y %m %d %j %H"),
        ))
    };
    let starts = |i: usize, s: &str| layout[i..].starts_with(s);
    while i < b.len() {
        let c = b[i];
        let (text, len): (&str, usize) = match c {
            b'2' if starts(i, "2006") => ("%Y", 4),
            b'2' => return refuse("2", "the day without a leading zero"),
            b'_' if starts(i, "_2006") => ("_%Y", 5),
            b'_' if starts(i, "_2") || starts(i, "__2") => return refuse("_2", "a space-padded day"),
            b'0' if i + 1 < b.len() && (b'1'..=b'6').contains(&b[i + 1]) => match b[i + 1] {
                b'1' => ("%m", 2),
                b'2' => ("%d", 2),
                b'6' => ("%y", 2),
                b'3' => return refuse("03", "the hour on a 12-hour clock"),
                b'4' => return refuse("04", "minutes"),
                _ => return refuse("05", "seconds"),
            },
            b'0' if starts(i, "002") => ("%j", 3),
            b'1' if starts(i, "15") => ("%H", 2),
            b'1' => return refuse("1", "the month without a leading zero"),
            b'3' | b'4' | b'5' => return refuse(&layout[i..=i], "an unpadded hour, minute or second"),
            b'J' if starts(i, "Jan") => return refuse("Jan", "a month's name"),
            b'M' if starts(i, "Mon") || starts(i, "MST") => return refuse("Mon/MST", "a day's name or a time zone"),
            b'P' if starts(i, "PM") => return refuse("PM", "AM or PM"),
            b'p' if starts(i, "pm") => return refuse("pm", "am or pm"),
            b'Z' if starts(i, "Z07") => return refuse("Z07", "a time zone"),
            b'-' if starts(i, "-07") => return refuse("-07", "a time zone"),
            b'.' | b',' if i + 1 < b.len() && (b[i + 1] == b'0' || b[i + 1] == b'9') && {
                let mut j = i + 1;
                while j < b.len() && b[j] == b[i + 1] {
                    j += 1;
                }
                !(j < b.len() && b[j].is_ascii_digit())
            } =>
            {
                return refuse(&layout[i..i + 2], "fractions of a second");
            }
            b'%' => ("%%", 1),
            _ => {
                let ch = layout[i..].chars().next().unwrap_or_default();
                out.extend(ch.to_lowercase());
                i += ch.len_utf8();
                continue;
            }
        };
        out.push_str(text);
        i += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::date_format;

    #[test]
    fn go_layouts_become_date_formats() {
        for (layout, format) in [
            ("2006-01-02", "%Y-%m-%d"),
            ("2006.01", "%Y.%m"),
            ("06-002", "%y-%j"),
            ("2006-01-02.15", "%Y-%m-%d.%H"),
            ("Day_2006", "day_%Y"),
            ("v2006%", "v%Y%%"),
        ] {
            assert_eq!(date_format(layout).expect(layout), format, "{layout}");
        }
        for layout in ["2006-01-02 15:04", "Jan 2006", "2006-1", "2006-01-2", "20060102150405", "2006.01.02.000"] {
            assert!(date_format(layout).is_err(), "{layout} refused");
        }
    }
}
