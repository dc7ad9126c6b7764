package main

import (
	"testing"

	"github.com/aetherium/aetherium-core/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }
