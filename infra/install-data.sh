#!/usr/bin/env bash
# Debian packages that hold the packaged evaluation sets (kdnas_core/evaluation/packaged.py): the SWORD
# Bible modules and the diatheke reader, and the tools whose message catalogues are translations;
# also the fortunes corpus of configs/multilingual.yaml. Installs only what is missing, so reruns are free.
# Without root (and without password-less sudo) it prints the command to run and exits 0:
# tests then fail with that same command in their message instead of this script failing make.
#   infra/install-data.sh
set -euo pipefail
# The gettext-<lang> sets read the message catalogues of small Debian tools (most are already
# on any Debian machine; the -l10n packages hold glibc's and GnuPG's translations).
packages=(sword-text-kjv sword-text-web sword-text-sparv diatheke
          coreutils bash tar grep sed findutils diffutils dpkg libc-l10n apt git gettext-base gnupg-l10n wget make
          xz-utils procps psmisc man-db
          # data.source: messages distils on other tools' catalogues, never on those above: the
          # binutils, GTK, GLib, desktop-schema and keyboard-layout messages (data packages only).
          binutils-common libgtk-3-common libgtk2.0-common libglib2.0-data gsettings-desktop-schemas xkb-data
          # General English distillation corpora (data.source: wordnet, gcide, or a mix of them):
          # WordNet's definitions and usage examples, the GNU dictionary's definitions.
          wordnet-base dict-gcide
          # The corpus of configs/multilingual.yaml: Debian fortunes in its eight languages.
          fortunes-min fortunes fortunes-de fortunes-es fortunes-it fortunes-ru fortunes-pl fortunes-cs fortunes-zh)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
reinstall=()
# Slim images drop /usr/share/locale from packages already installed: put the catalogues back.
if [ ! -f /usr/share/locale/de/LC_MESSAGES/coreutils.mo ] && ! grep -rqs "path-exclude=/usr/share/locale" /etc/dpkg/dpkg.cfg.d; then
  reinstall=(coreutils libc-l10n)
fi
[ ${#missing[@]} -eq 0 ] && [ ${#reinstall[@]} -eq 0 ] && exit 0

if ! command -v apt-get > /dev/null; then
  echo "install-data: no apt-get here; install the Debian packages ${missing[*]} (or their equivalents) by hand"
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo > /dev/null && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "install-data: not root; run: sudo apt-get install -y --no-install-recommends ${missing[*]}"
  exit 0
fi

install=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends
         ${reinstall:+--reinstall} "${missing[@]}" "${reinstall[@]}")
# The package lists may be stale or absent on a fresh machine: refresh them only when needed.
if ! "${install[@]}" > /dev/null; then
  "${sudo[@]}" apt-get update -qq
  "${install[@]}" > /dev/null
fi
echo "install-data: installed ${missing[*]} ${reinstall[*]}"
