// podutil is the one program of the local node's helper image (tests/harness/src/node.rs): with no
// arguments it is the pod sandbox ("pause") process, and its subcommands are small probes a test
// runs inside a pod, reporting through the termination message Kubernetes copies into the Pod's
// status (/dev/termination-log, at most 4 KiB).
//
//	podutil                 block until SIGTERM or SIGINT, reaping orphans (the sandbox)
//	podutil get URL         GET URL; the message is "STATUS BODY"; exit 0 on a 2xx answer
//	podutil cat FILE...     the message is the files' contents, concatenated
//	podutil sleep SECONDS   sleep, then exit 0
//	podutil init CMD ARG... PID 1 of a node's namespaces (see tests/harness/src/sandbox.rs):
//	                        bring loopback up, mount a tmpfs on /run, run CMD, forward
//	                        SIGINT/SIGTERM/SIGHUP/SIGQUIT to it, reap every orphan (the
//	                        containerd shims), exit with CMD's status
//
// Built statically (CGO_ENABLED=0) by tools/build.sh; it must not need anything but the kernel.
package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

const terminationLog = "/dev/termination-log"

func main() {
	if len(os.Args) < 2 {
		pause()
		return
	}
	switch os.Args[1] {
	case "get":
		if len(os.Args) != 3 {
			usage()
		}
		os.Exit(get(os.Args[2]))
	case "cat":
		os.Exit(cat(os.Args[2:]))
	case "init":
		if len(os.Args) < 3 {
			usage()
		}
		os.Exit(initProcess(os.Args[2:]))
	case "sleep":
		s, err := strconv.Atoi(argOr(2, ""))
		if err != nil {
			usage()
		}
		time.Sleep(time.Duration(s) * time.Second)
	default:
		usage()
	}
}

func argOr(i int, def string) string {
	if len(os.Args) > i {
		return os.Args[i]
	}
	return def
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: podutil [get URL | cat FILE... | sleep SECONDS | init CMD ARG...]")
	os.Exit(2)
}

// pause blocks until SIGTERM or SIGINT; as PID 1 of a pod it also reaps orphaned children.
func pause() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range signals {
		if s != syscall.SIGCHLD {
			return
		}
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}

// report writes the termination message (and stdout, for `kubectl logs`).
func report(message string) {
	fmt.Println(message)
	if err := os.WriteFile(terminationLog, []byte(message), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "podutil:", err)
	}
}

func get(url string) int {
	client := http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		report("error " + err.Error())
		return 1
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 3072))
	if err != nil {
		report("error " + err.Error())
		return 1
	}
	report(fmt.Sprintf("%d %s", resp.StatusCode, body))
	if resp.StatusCode/100 != 2 {
		return 1
	}
	return 0
}

func cat(files []string) int {
	var out []byte
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			report("error " + err.Error())
			return 1
		}
		out = append(out, b...)
	}
	report(string(out))
	return 0
}

// initProcess is PID 1 of a node's namespaces: it sets them up, runs argv as its only direct
// child, passes down the descriptors it inherited, forwards termination signals, reaps whatever
// is orphaned to it and exits with argv's status (which ends the PID namespace).
func initProcess(argv []string) int {
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "podutil init: not PID 1 of a PID namespace")
		return 2
	}
	if out, err := exec.Command("ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "podutil init: ip link set lo up: %v: %s\n", err, out)
		return 1
	}
	// containerd's shim sockets and FIFOs, runc's state: private to the run, gone with it.
	if err := syscall.Mount("tmpfs", "/run", "tmpfs", 0, "mode=755"); err != nil {
		fmt.Fprintln(os.Stderr, "podutil init: mounting a tmpfs on /run:", err)
		return 1
	}
	path, err := exec.LookPath(argv[0])
	if err != nil {
		fmt.Fprintln(os.Stderr, "podutil init:", err)
		return 127
	}
	signals := make(chan os.Signal, 32)
	signal.Notify(signals, syscall.SIGCHLD, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT)
	pid, err := syscall.ForkExec(path, argv, &syscall.ProcAttr{Env: os.Environ(), Files: inheritedFds()})
	if err != nil {
		fmt.Fprintln(os.Stderr, "podutil init:", err)
		return 127
	}
	for s := range signals {
		if s != syscall.SIGCHLD {
			_ = syscall.Kill(pid, s.(syscall.Signal))
			continue
		}
		for {
			var status syscall.WaitStatus
			reaped, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if reaped <= 0 || err != nil {
				break
			}
			if reaped == pid {
				if status.Signaled() {
					return 128 + int(status.Signal())
				}
				return status.ExitStatus()
			}
		}
	}
	return 1
}

// inheritedFds lists descriptors 0, 1, 2 and every higher one this process inherited without
// close-on-exec (such as a listening socket of the host's network namespace), at their numbers.
func inheritedFds() []uintptr {
	fds := []uintptr{0, 1, 2}
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return fds
	}
	for _, e := range entries {
		fd, err := strconv.Atoi(e.Name())
		if err != nil || fd < 3 || fd > 1023 {
			continue
		}
		flags, _, errno := syscall.Syscall(syscall.SYS_FCNTL, uintptr(fd), syscall.F_GETFD, 0)
		if errno != 0 || flags&syscall.FD_CLOEXEC != 0 {
			continue
		}
		for len(fds) <= fd {
			fds = append(fds, ^uintptr(0)) // closed in the child
		}
		fds[fd] = uintptr(fd)
	}
	return fds
}
