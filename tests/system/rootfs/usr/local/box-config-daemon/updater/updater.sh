#!/bin/bash
# Stand-in of the original OPQ Box updater (box-config-daemon/updater/updater.sh): no checks at
# all, and it reboots whatever happened.
if [[ -z "$1" ]]; then
    echo "usage: ./updater.sh [updates endpoint]"
    exit 1
fi
UPDATES_ENDPOINT=${1}
rm -rf opq-box-update-*
echo "Downloading latest update..."
wget "${UPDATES_ENDPOINT}/latest" -O update.tar.bz2
echo "Extracting contents..."
tar xf update.tar.bz2
echo "Running update script..."
cd opq-box-update-* || exit 1
sudo ./install_update.sh
cd ..
rm -rf opq-box-update* update.tar.bz2
echo "Rebooting..."
sudo reboot
