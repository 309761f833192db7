//! OTLP over gRPC keeps a request through a failing connection: a request whose connection
//! is reset is retried until the receiver (the official Python `grpcio` one,
//! tests/peers/otlp_receiver.py) takes it; and a header the protocol cannot send is refused
//! by `--check` instead of failing every export.

mod common;

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    time::Duration,
};

use common::{otlp_peer::Receiver, *};

const LIMIT: Duration = Duration::from_secs(60);

/// A TCP front on 127.0.0.1 for the receiver at `target_port`: it resets (RST) each of its
/// first `resets` connections as soon as the client has written to it, and relays every
/// later connection to the receiver. Returns its port.
fn resetting_front(target_port: u16, resets: usize) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for (n, client) in listener.incoming().take(50).enumerate() {
            let Ok(mut client) = client else { continue };
            if n < resets {
                let _ = client.read(&mut [0; 1024]);
                reset(client);
                continue;
            }
            let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)) else {
                continue;
            };
            relay(client.try_clone().unwrap(), server.try_clone().unwrap());
            relay(server, client);
        }
    });
    port
}

/// Closes `stream` with a TCP reset instead of an orderly shutdown.
fn reset(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a linger struct of the size given.
    let set = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0, "SO_LINGER");
}

/// Copies `from` into `to` on a thread until `from` ends.
fn relay(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buffer = [0; 16 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buffer) {
            if to.write_all(&buffer[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

fn replay_into_otlp(dir: &Path, batches: usize, otlp: &str) -> std::path::PathBuf {
    let recording = write_recording(dir, &small_batches(batches));
    write_config(
        dir,
        &format!(
            "shutdown_timeout = \"20s\"\n[producer]\nkind = \"replay\"\nreplay.path = \"{}\"\n\
             [consumers.otlp]\n{otlp}\n",
            recording.display()
        ),
    )
}

#[test]
fn a_reset_connection_is_retried_until_the_receiver_takes_the_request() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path(), 0);
    let front = resetting_front(receiver.grpc_port, 2);
    let config = replay_into_otlp(
        dir.path(),
        2,
        &format!("endpoint = \"http://127.0.0.1:{front}\"\nretry_backoff = \"100ms\""),
    );
    let log = expect_success(run_with_limit(router().arg("--config").arg(&config), LIMIT));
    assert!(!log.contains("not retried"), "{log}");
    assert!(log.contains("; retrying"), "{log}");
    assert!(log.contains("exported=2 dropped=0 rejected=0"), "{log}");
    assert_eq!(receiver.requests().len(), 2, "{log}");
}

#[test]
fn a_header_that_cannot_be_sent_is_refused_by_check_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    for (protocol, headers) in [
        (
            "grpc",
            "{ Authorization = \"Bearer s3cr3t\\nX-Injected: 1\" }",
        ),
        (
            "http/protobuf",
            "{ Authorization = \"Bearer s3cr3t\\r\\n\" }",
        ),
        ("http/protobuf", "{ \"X Tenant\" = \"s3cr3t\" }"),
    ] {
        let config = replay_into_otlp(
            dir.path(),
            1,
            &format!("protocol = \"{protocol}\"\nheaders = {headers}"),
        );
        let out = run_with_limit(router().arg("--config").arg(&config).arg("--check"), LIMIT);
        let shown = text(&out);
        assert!(!out.status.success(), "{headers}: {shown}");
        assert!(shown.contains("otlp: headers: "), "{headers}: {shown}");
        assert!(!shown.contains("s3cr3t"), "{headers}: {shown}");
    }
}
