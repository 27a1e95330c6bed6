//! git's pkt-line framing (gitprotocol-common(5)), as the proc-receive hook
//! speaks it with receive-pack: four hex digits of length (including
//! themselves), then the payload; "0000" is a flush.

use std::io::{self, Read, Write};

/// Largest pkt-line git sends or accepts: 65520 bytes in all.
pub const MAX_PAYLOAD: usize = 65520 - 4;

/// One packet: `Some(payload)` (a trailing LF removed), or `None` for a flush.
pub fn read(r: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = std::str::from_utf8(&len)
        .ok()
        .and_then(|s| usize::from_str_radix(s, 16).ok())
        .ok_or_else(|| bad(format!("bad pkt-line length {len:?}")))?;
    match len {
        0 => Ok(None),
        1..=3 => Err(bad(format!("bad pkt-line length {len}"))),
        _ if len - 4 > MAX_PAYLOAD => Err(bad(format!("pkt-line of {len} bytes is too long"))),
        _ => {
            let mut payload = vec![0u8; len - 4];
            r.read_exact(&mut payload)?;
            if payload.last() == Some(&b'\n') {
                payload.pop();
            }
            Ok(Some(payload))
        }
    }
}

/// Every packet up to the next flush.
pub fn read_section(r: &mut impl Read) -> io::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while let Some(p) = read(r)? {
        out.push(p);
    }
    Ok(out)
}

pub fn write(w: &mut impl Write, payload: &[u8]) -> io::Result<()> {
    let payload = &payload[..payload.len().min(MAX_PAYLOAD)];
    write!(w, "{:04x}", payload.len() + 4)?;
    w.write_all(payload)
}

pub fn flush(w: &mut impl Write) -> io::Result<()> {
    w.write_all(b"0000")?;
    w.flush()
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_flushes() {
        let mut buf = Vec::new();
        write(&mut buf, b"version=1\0atomic").unwrap();
        flush(&mut buf).unwrap();
        write(&mut buf, b"ok refs/heads/main\n").unwrap();
        flush(&mut buf).unwrap();
        assert_eq!(&buf[..4], b"0014");
        let mut r = &buf[..];
        assert_eq!(
            read_section(&mut r).unwrap(),
            vec![b"version=1\0atomic".to_vec()]
        );
        assert_eq!(
            read_section(&mut r).unwrap(),
            vec![b"ok refs/heads/main".to_vec()]
        );
        assert!(r.is_empty());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [&b"zzzz"[..], b"0002", b"0009abc", b"00", b"ffff"] {
            let mut r = bad;
            assert!(read_section(&mut r).is_err(), "{bad:?}");
        }
    }
}
