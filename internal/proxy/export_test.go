package proxy

// ParkAfter lets tests wait past the relay's quiet time.
const ParkAfter = parkAfter
