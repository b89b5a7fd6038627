//! The records' compact form in the log: a commit writes each changed record, so its encoding
//! is paid once per changed record per commit (JSON, redb's form, cost ~2,600 instructions more
//! per record: `WORKLOAD=tenants loadtest/instructions.sh`, ledger writer 6,537 → 3,891 per call).
//! redb keeps JSON; a fold converts each record once.
//!
//! ```text
//! name  = table (u8) | identity          (what the log coalesces on)
//! value = fields
//! uint  = LEB128 (7 bits a byte, low first);  str = length uint | UTF-8 bytes;  bool = u8
//! dec   = scale | 0x80 when negative (u8), then the mantissa's magnitude as a uint
//! package:     identity = tenant str, id str;   fields = consumed dec, alerted bool
//! month:       identity = tenant, feature, month str;  fields = 5 unit decs, payg cells
//!              (count uint, then str, dec each), unpaid dec, integer bool
//! image count: identity = tenant str;   fields = count uint
//! ```
//!
//! A month record of a per-call feature is ~60 bytes in this form. Segments of the first log
//! format ([`super::wal::MAGIC_V1`]) wrote lengths and counts as u32 LE and decimals in
//! rust_decimal's 16-byte form (~180 bytes a month record); [`decode_v1`] reads them.

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use super::{ImageCountRecord, MonthRecord, PackageRecord, Record};
use crate::config::Dec;

/// Appends `n` as LEB128.
pub fn uint(out: &mut Vec<u8>, mut n: u128) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Reads a LEB128 number of at most `bits` (< 128) bits off the front of `input`, in its
/// shortest form only: a name has one spelling, so the log coalesces a record's values under
/// one key.
pub fn take_uint(input: &mut &[u8], bits: u32) -> Result<u128, &'static str> {
    let (mut n, mut shift) = (0u128, 0u32);
    loop {
        let (&b, rest) = input.split_first().ok_or("record cut short")?;
        *input = rest;
        n |= u128::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            if b == 0 && shift > 0 {
                return Err("a number not in its shortest form");
            }
            return if n >> bits == 0 { Ok(n) } else { Err("a number out of range") };
        }
        shift += 7;
        if shift > bits {
            return Err("a number out of range");
        }
    }
}

fn str(out: &mut Vec<u8>, s: &str) {
    uint(out, s.len() as u128);
    out.extend_from_slice(s.as_bytes());
}

fn dec(out: &mut Vec<u8>, d: Dec) {
    // The scale is at most 28: it and the sign fit a byte, and the sign of a zero is kept.
    out.push(d.0.scale() as u8 | if d.0.is_sign_negative() { 0x80 } else { 0 });
    uint(out, d.0.mantissa().unsigned_abs());
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
            uint(out, m.payg.len() as u128);
            for (cell, units) in &m.payg {
                str(out, cell);
                dec(out, *units);
            }
            dec(out, m.unpaid);
            out.push(u8::from(m.integer));
        }
        Record::ImageCount(i) => uint(out, u128::from(i.count)),
    }
}

/// Which form a reader reads: the current one, or the first log format's.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Form {
    Compact,
    V1,
}

struct Reader<'a>(&'a [u8], Form);

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], &'static str> {
        let (head, rest) = self.0.split_first_chunk::<N>().ok_or("record cut short")?;
        self.0 = rest;
        Ok(*head)
    }

    fn uint(&mut self, bits: u32) -> Result<u128, &'static str> {
        take_uint(&mut self.0, bits)
    }

    fn len(&mut self) -> Result<usize, &'static str> {
        match self.1 {
            Form::Compact => usize::try_from(self.uint(32)?).map_err(|_| "a length out of range"),
            Form::V1 => Ok(u32::from_le_bytes(self.take()?) as usize),
        }
    }

    fn str(&mut self) -> Result<String, &'static str> {
        let n = self.len()?;
        if self.0.len() < n {
            return Err("record cut short");
        }
        let (s, rest) = self.0.split_at(n);
        self.0 = rest;
        String::from_utf8(s.to_vec()).map_err(|_| "a name is not UTF-8")
    }

    fn dec(&mut self) -> Result<Dec, &'static str> {
        if self.1 == Form::V1 {
            return Ok(Dec(Decimal::deserialize(self.take()?)));
        }
        let [head] = self.take()?;
        let (scale, negative) = (u32::from(head & 0x7f), head & 0x80 != 0);
        // rust_decimal's mantissa is 96 bits.
        let m = i128::try_from(self.uint(96)?).map_err(|_| "a decimal out of range")?;
        let mut d = Decimal::try_from_i128_with_scale(m, scale).map_err(|_| "a decimal out of range")?;
        d.set_sign_negative(negative);
        Ok(Dec(d))
    }

    fn bool(&mut self) -> Result<bool, &'static str> {
        match self.take::<1>()? {
            [0] => Ok(false),
            [1] => Ok(true),
            _ => Err("a flag is neither 0 nor 1"),
        }
    }

    fn u64(&mut self) -> Result<u64, &'static str> {
        match self.1 {
            Form::Compact => u64::try_from(self.uint(64)?).map_err(|_| "a number out of range"),
            Form::V1 => Ok(u64::from_le_bytes(self.take()?)),
        }
    }
}

/// Reads a record of `table` (0 packages, 1 months, 2 image counts) back from its identity and
/// its value.
pub fn decode(table: usize, identity: &[u8], value: &[u8]) -> Result<Record, &'static str> {
    decode_in(Form::Compact, table, identity, value)
}

/// [`decode`] for a record of a segment in the first log format.
pub fn decode_v1(table: usize, identity: &[u8], value: &[u8]) -> Result<Record, &'static str> {
    decode_in(Form::V1, table, identity, value)
}

fn decode_in(form: Form, table: usize, identity: &[u8], value: &[u8]) -> Result<Record, &'static str> {
    let (mut id, mut r) = (Reader(identity, form), Reader(value, form));
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
            let cells = r.len()?;
            let mut payg = BTreeMap::new();
            for _ in 0..cells {
                let cell = r.str()?;
                payg.insert(cell, r.dec()?);
            }
            Record::Month(MonthRecord { tenant, feature, month, units, payg, unpaid: r.dec()?, integer: r.bool()? })
        }
        2 => Record::ImageCount(ImageCountRecord { tenant: id.str()?, count: r.u64()? }),
        _ => return Err("unknown table"),
    };
    if !id.0.is_empty() || !r.0.is_empty() {
        return Err("bytes after the record");
    }
    Ok(record)
}

#[cfg(test)]
pub(super) mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The first form's encoding (the log format before `TSWAL02`), as it was written.
    pub fn v1_name_and_value(r: &Record) -> (Vec<u8>, Vec<u8>) {
        fn str(out: &mut Vec<u8>, s: &str) {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        let dec = |out: &mut Vec<u8>, d: Dec| out.extend_from_slice(&d.0.serialize());
        let (mut name, mut value) = (vec![r.table()], Vec::new());
        match r {
            Record::Package(p) => {
                str(&mut name, &p.tenant);
                str(&mut name, &p.id);
                dec(&mut value, p.consumed);
                value.push(u8::from(p.alerted));
            }
            Record::Month(m) => {
                for s in [&m.tenant, &m.feature, &m.month] {
                    str(&mut name, s);
                }
                m.units.iter().for_each(|u| dec(&mut value, *u));
                value.extend_from_slice(&(m.payg.len() as u32).to_le_bytes());
                for (cell, units) in &m.payg {
                    str(&mut value, cell);
                    dec(&mut value, *units);
                }
                dec(&mut value, m.unpaid);
                value.push(u8::from(m.integer));
            }
            Record::ImageCount(i) => {
                str(&mut name, &i.tenant);
                value.extend_from_slice(&i.count.to_le_bytes());
            }
        }
        (name, value)
    }

    fn encoded(r: &Record) -> (Vec<u8>, Vec<u8>) {
        let (mut i, mut v) = (Vec::new(), Vec::new());
        identity(r, &mut i);
        fields(r, &mut v);
        (i, v)
    }

    /// Reads back as written, to the bit (a decimal's scale and the sign of a zero too, which
    /// `==` on decimals does not see), and a record cut short or followed by a byte does not.
    fn roundtrip(r: Record) {
        let (i, v) = encoded(&r);
        let t = usize::from(r.table());
        let back = decode(t, &i, &v).expect("reads back");
        assert_eq!(back, r);
        assert_eq!(encoded(&back), (i.clone(), v.clone()), "the same bytes again");
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
        // The first form of the same record reads as the same record.
        let (name, value) = v1_name_and_value(&r);
        assert_eq!(decode_v1(t, &name[1..], &value), Ok(r));
    }

    fn month(payg: BTreeMap<String, Dec>) -> MonthRecord {
        MonthRecord {
            tenant: "a\"b\\ü".into(),
            feature: "video-enhance".into(),
            month: "2026-12".into(),
            units: [1i64, 0, 3, 4_000_000_000, 5].map(|u| Dec(Decimal::from(u))),
            payg,
            unpaid: Dec(Decimal::new(25, 1)),
            integer: true,
        }
    }

    #[test]
    fn every_record_reads_back_as_written_and_a_cut_one_does_not() {
        let mut payg = BTreeMap::new();
        payg.insert(String::new(), Dec(Decimal::new(17, 0)));
        payg.insert("fps<=60,lines<=1440".into(), Dec(Decimal::new(-123_456_789, 6)));
        payg.insert("x".repeat(300), Dec(Decimal::MAX));
        roundtrip(Record::Month(month(payg)));
        roundtrip(Record::Package(PackageRecord {
            tenant: String::new(),
            id: "od-1".into(),
            consumed: Dec(Decimal::new(1, 28)),
            alerted: true,
        }));
        roundtrip(Record::Package(PackageRecord {
            tenant: "t".into(),
            id: "p".into(),
            consumed: Dec(Decimal::MIN),
            alerted: false,
        }));
        roundtrip(Record::ImageCount(ImageCountRecord { tenant: "t".into(), count: u64::MAX }));
        roundtrip(Record::ImageCount(ImageCountRecord { tenant: "t".into(), count: 0 }));
    }

    /// What the compact form is for: a per-call feature's month, written once per call with
    /// many tenants, is a third of its first form.
    #[test]
    fn a_per_call_month_record_is_a_third_of_its_first_form() {
        let mut r = month(BTreeMap::from([(String::new(), Dec(Decimal::from(1234)))]));
        (r.tenant, r.feature) = ("tenant-00042".into(), "license-plate-recognition".into());
        r.units = [0i64, 0, 0, 1234, 0].map(|u| Dec(Decimal::from(u)));
        r.unpaid = Dec(Decimal::ZERO);
        let r = Record::Month(r);
        let (i, v) = encoded(&r);
        let (name, value) = v1_name_and_value(&r);
        assert_eq!((1 + i.len(), v.len()), (48, 19));
        assert_eq!((name.len(), value.len()), (57, 121));
    }

    #[test]
    fn numbers_have_one_spelling_and_a_bounded_size() {
        let read = |bytes: &[u8], bits| take_uint(&mut &bytes[..], bits);
        assert_eq!(read(&[0x00], 32), Ok(0));
        assert_eq!(read(&[0xff, 0x01], 32), Ok(255));
        assert_eq!(read(&[0x80, 0x00], 32), Err("a number not in its shortest form"));
        assert_eq!(read(&[0xff, 0xff, 0xff, 0xff, 0x0f], 32), Ok(u128::from(u32::MAX)));
        assert_eq!(read(&[0xff, 0xff, 0xff, 0xff, 0x1f], 32), Err("a number out of range"));
        assert_eq!(read(&[0xff, 0xff, 0xff, 0xff, 0x8f, 0x01], 32), Err("a number out of range"));
        assert_eq!(read(&[0xff], 32), Err("record cut short"));
        // A decimal's mantissa is at most 96 bits.
        let mut v = vec![0u8];
        uint(&mut v, 1u128 << 96);
        assert_eq!(Reader(&v, Form::Compact).dec(), Err("a number out of range"));
        // Its scale at most 28.
        let mut v = vec![29u8];
        uint(&mut v, 1);
        assert_eq!(Reader(&v, Form::Compact).dec(), Err("a decimal out of range"));
    }

    proptest! {
        #[test]
        fn any_decimal_and_count_reads_back_to_the_bit(
            lo: u32, mid: u32, hi: u32, negative: bool, scale in 0u32..=28, count: u64,
        ) {
            let d = Dec(Decimal::from_parts(lo, mid, hi, negative, scale));
            let mut v = Vec::new();
            dec(&mut v, d);
            uint(&mut v, u128::from(count));
            let mut r = Reader(&v, Form::Compact);
            let back = r.dec().unwrap();
            prop_assert_eq!(back.0.serialize(), d.0.serialize());
            prop_assert_eq!(r.u64(), Ok(count));
            prop_assert!(r.0.is_empty());
        }
    }
}
