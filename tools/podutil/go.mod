module authprobe.io/tools/podutil

go 1.26.0
