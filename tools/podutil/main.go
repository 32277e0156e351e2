// podutil is the one program of the local node's helper image (tests/harness/src/node.rs): with no
// arguments it is the pod sandbox ("pause") process, and its subcommands are small probes a test
// runs inside a pod, reporting through the termination message Kubernetes copies into the Pod's
// status (/dev/termination-log, at most 4 KiB).
//
//	podutil                 block until SIGTERM or SIGINT, reaping orphans (the sandbox)
//	podutil get URL         GET URL; the message is "STATUS BODY"; exit 0 on a 2xx answer
//	podutil cat FILE...     the message is the files' contents, concatenated
//	podutil sleep SECONDS   sleep, then exit 0
//
// Built statically (CGO_ENABLED=0) by tools/build.sh; it must not need anything but the kernel.
package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
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
	fmt.Fprintln(os.Stderr, "usage: podutil [get URL | cat FILE... | sleep SECONDS]")
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
