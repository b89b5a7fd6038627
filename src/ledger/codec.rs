//! The records' compact form in the log: a commit writes each changed record, so its encoding
//! is paid once per changed record per commit (JSON, redb's form, cost ~2,600 instructions more
//! per record: `WORKLOAD=tenants loadtest/instructions.sh`, ledger writer 6,537 → 3,891 per call).
//! redb keeps JSON; a fold converts each record once.
//!
//! ```text
//! name  = table (u8) | identity          (what the log coalesces on)
//! value = fields
//! str   = length (u32 LE) | UTF-8 bytes;  dec = rust_decimal's 16-byte form;  bool = u8
//! package:     identity = tenant str, id str;   fields = consumed dec, alerted bool
//! month:       identity = tenant, feature, month str;  fields = 5 unit decs, payg cells
//!              (count u32, then str, dec each), unpaid dec, integer bool
//! image count: identity = tenant str;   fields = count u64 LE
//! ```

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use super::{ImageCountRecord, MonthRecord, PackageRecord, Record};
use crate::config::Dec;

fn str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn dec(out: &mut Vec<u8>, d: Dec) {
    out.extend_from_slice(&d.0.serialize());
}

/// Writes a record's identity (its name without the table byte).
pub fn identity(r: &Record, out: &mut Vec<u8>) {
    match r {
        Record::Package(p) => {
            str(out, &p.tenant);
            str(out, &p.id);
        }
        Record::Month(m) => {
            str(out, &m.tenant);
            str(out, &m.feature);
            str(out, &m.month);
        }
        Record::ImageCount(i) => str(out, &i.tenant),
    }
}

/// Writes a record's value: the fields after its identity.
pub fn fields(r: &Record, out: &mut Vec<u8>) {
    match r {
        Record::Package(p) => {
            dec(out, p.consumed);
            out.push(u8::from(p.alerted));
        }
        Record::Month(m) => {
            for u in m.units {
                dec(out, u);
            }
            out.extend_from_slice(&(m.payg.len() as u32).to_le_bytes());
            for (cell, units) in &m.payg {
                str(out, cell);
                dec(out, *units);
            }
            dec(out, m.unpaid);
            out.push(u8::from(m.integer));
        }
        Record::ImageCount(i) => out.extend_from_slice(&i.count.to_le_bytes()),
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], &'static str> {
        let (head, rest) = self.0.split_first_chunk::<N>().ok_or("record cut short")?;
        self.0 = rest;
        Ok(*head)
    }

    fn str(&mut self) -> Result<String, &'static str> {
        let n = u32::from_le_bytes(self.take()?) as usize;
        if self.0.len() < n {
            return Err("record cut short");
        }
        let (s, rest) = self.0.split_at(n);
        self.0 = rest;
        String::from_utf8(s.to_vec()).map_err(|_| "a name is not UTF-8")
    }

    fn dec(&mut self) -> Result<Dec, &'static str> {
        Ok(Dec(Decimal::deserialize(self.take()?)))
    }

    fn bool(&mut self) -> Result<bool, &'static str> {
        match self.take::<1>()? {
            [0] => Ok(false),
            [1] => Ok(true),
            _ => Err("a flag is neither 0 nor 1"),
        }
    }
}

/// Reads a record of `table` (0 packages, 1 months, 2 image counts) back from its identity and
/// its value.
pub fn decode(table: usize, identity: &[u8], value: &[u8]) -> Result<Record, &'static str> {
    let (mut id, mut r) = (Reader(identity), Reader(value));
    let record = match table {
        0 => {
            Record::Package(PackageRecord { tenant: id.str()?, id: id.str()?, consumed: r.dec()?, alerted: r.bool()? })
        }
        1 => {
            let (tenant, feature, month) = (id.str()?, id.str()?, id.str()?);
            let mut units = [Dec(Decimal::ZERO); 5];
            for u in &mut units {
                *u = r.dec()?;
            }
            let cells = u32::from_le_bytes(r.take()?);
            let mut payg = BTreeMap::new();
            for _ in 0..cells {
                let cell = r.str()?;
                payg.insert(cell, r.dec()?);
            }
            Record::Month(MonthRecord { tenant, feature, month, units, payg, unpaid: r.dec()?, integer: r.bool()? })
        }
        2 => Record::ImageCount(ImageCountRecord { tenant: id.str()?, count: u64::from_le_bytes(r.take()?) }),
        _ => return Err("unknown table"),
    };
    if !id.0.is_empty() || !r.0.is_empty() {
        return Err("bytes after the record");
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(r: Record) {
        let (mut i, mut v) = (Vec::new(), Vec::new());
        identity(&r, &mut i);
        fields(&r, &mut v);
        let t = usize::from(r.table());
        assert_eq!(decode(t, &i, &v), Ok(r.clone()));
        for cut in 0..v.len() {
            assert!(decode(t, &i, &v[..cut]).is_err(), "value cut at {cut}");
        }
        for cut in 0..i.len() {
            assert!(decode(t, &i[..cut], &v).is_err(), "identity cut at {cut}");
        }
        let (mut long_i, mut long_v) = (i.clone(), v.clone());
        long_i.push(0);
        long_v.push(0);
        assert!(decode(t, &long_i, &v).is_err());
        assert!(decode(t, &i, &long_v).is_err());
    }

    #[test]
    fn every_record_reads_back_as_written_and_a_cut_one_does_not() {
        let mut payg = BTreeMap::new();
        payg.insert(String::new(), Dec(Decimal::new(17, 0)));
        payg.insert("fps<=60,lines<=1440".into(), Dec(Decimal::new(-123_456_789, 6)));
        roundtrip(Record::Month(MonthRecord {
            tenant: "a\"b\\ü".into(),
            feature: "video-enhance".into(),
            month: "2026-12".into(),
            units: [1i64, 0, 3, 4_000_000_000, 5].map(|u| Dec(Decimal::from(u))),
            payg,
            unpaid: Dec(Decimal::new(25, 1)),
            integer: true,
        }));
        roundtrip(Record::Package(PackageRecord {
            tenant: String::new(),
            id: "od-1".into(),
            consumed: Dec(Decimal::new(1, 28)),
            alerted: true,
        }));
        roundtrip(Record::ImageCount(ImageCountRecord { tenant: "t".into(), count: u64::MAX }));
    }
}
