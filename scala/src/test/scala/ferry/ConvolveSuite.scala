package ferry

import java.io.File
import java.nio.charset.StandardCharsets
import java.nio.file.Files

import scala.sys.process._

import org.apache.spark.sql.{DataFrame, Encoders, Row}
import org.apache.spark.sql.execution.streaming.runtime.MemoryStream
import org.apache.spark.sql.functions.{col, lit, when}
import org.apache.spark.sql.types._
import org.scalatest.funsuite.AnyFunSuite

class ConvolveSuite extends AnyFunSuite with SparkSuite {

  import ConvolveSuite._

  private val seriesSchema = StructType(Seq(
    StructField("id", LongType, nullable = false), StructField("real", DoubleType), StructField("imag", DoubleType)))

  private def series(n: Int, seed: Long): (Array[Double], Array[Double]) = {
    val rnd = new scala.util.Random(seed)
    (Array.fill(n)(rnd.nextGaussian()), Array.fill(n)(rnd.nextGaussian()))
  }

  private def kernel(l: Int, seed: Long): (Array[Double], Array[Double]) = {
    val rnd = new scala.util.Random(seed * 31 + l)
    (Array.fill(l)(rnd.nextDouble() - 0.5), Array.fill(l)(rnd.nextDouble() - 0.5))
  }

  private def rowsOf(re: Array[Double], im: Array[Double]): IndexedSeq[Row] =
    re.indices.map(i => Row(i.toLong, re(i), im(i)))

  /** Contiguous layout: parallelize slices the ids into P consecutive ranges. */
  private def contiguous(re: Array[Double], im: Array[Double], p: Int): DataFrame =
    spark.createDataFrame(spark.sparkContext.parallelize(rowsOf(re, im), p), seriesSchema)

  /** Blocks of `block` consecutive ids dealt to P partitions in a shuffled order: several runs per partition. */
  private def blocks(re: Array[Double], im: Array[Double], p: Int, block: Int, seed: Long): DataFrame = {
    val bs = re.indices.grouped(block).toIndexedSeq
    val order = new scala.util.Random(seed).shuffle(bs.indices.toIndexedSeq)
    val rows = order.flatMap(b => bs(b).map(i => Row(i.toLong, re(i), im(i))))
    spark.createDataFrame(spark.sparkContext.parallelize(rows, p), seriesSchema)
  }

  private def layouts(re: Array[Double], im: Array[Double]): Seq[(String, () => DataFrame)] = Seq(
    "contiguous(1)" -> (() => contiguous(re, im, 1)),
    "contiguous(3)" -> (() => contiguous(re, im, 3)),
    "contiguous(7)" -> (() => contiguous(re, im, 7)),
    "repartition(1)" -> (() => contiguous(re, im, 3).repartition(1)),
    "repartition(3)" -> (() => contiguous(re, im, 2).repartition(3)),
    "repartition(7)" -> (() => contiguous(re, im, 2).repartition(7)),
    "coalesce(7->3)" -> (() => contiguous(re, im, 7).coalesce(3)),
    "blocks(3)" -> (() => blocks(re, im, 3, math.max(1, re.length / 10), 7L)))

  /** Runs Convolve and compares with the direct double-precision reference (numpy semantics). */
  private def check(df: DataFrame, re: Array[Double], im: Array[Double], kr: Array[Double], ki: Array[Double],
      mode: String, what: String, realOnly: Boolean = false): Unit = {
    val conv = new Convolve().setKernelReal(kr).setKernelImag(ki).setMode(mode)
    if (realOnly) conv.setImagCol("")
    val out = conv.transform(df)
    assert(out.schema == Convolve.outputSchema("id", "real", "imag"))
    val rows = out.collect()
    val (er, ei) = reference(re, if (realOnly) new Array[Double](re.length) else im, kr, ki, mode)
    assert(rows.length == er.length, s"$what: ${rows.length} rows, expected ${er.length}")
    val gr = new Array[Double](er.length)
    val gi = new Array[Double](er.length)
    val seen = new Array[Boolean](er.length)
    rows.foreach { r =>
      val o = r.getLong(0).toInt
      assert(o >= 0 && o < er.length && !seen(o), s"$what: output id $o out of range or repeated")
      seen(o) = true
      gr(o) = r.getDouble(1)
      gi(o) = r.getDouble(2)
    }
    val scale = math.max(1e-300, er.indices.map(o => math.hypot(er(o), ei(o))).max)
    val err = er.indices.map(o => math.hypot(gr(o) - er(o), gi(o) - ei(o))).max
    assert(err <= 1e-9 * scale, s"$what: max error $err relative to max |y| $scale")
  }

  test("the JVM reference equals numpy.convolve (checked once through the venv's Python)") {
    val (re, im) = series(7, 1)
    val (kr, ki) = kernel(4, 1)
    val script =
      s"""import numpy as np, json
         |x = np.array(${re.mkString("[", ",", "]")}) + 1j*np.array(${im.mkString("[", ",", "]")})
         |k = np.array(${kr.mkString("[", ",", "]")}) + 1j*np.array(${ki.mkString("[", ",", "]")})
         |out = {}
         |for m in ("full", "same", "valid"):
         |    for a, b, tag in ((x, k, "xk"), (x[:2], k, "short")):
         |        y = np.convolve(a, b, m)
         |        out[m + tag] = [[float(v.real) for v in y], [float(v.imag) for v in y]]
         |print(json.dumps(out))
         |""".stripMargin
    val f = File.createTempFile("ferry-ref", ".py", TestSpark.tempDir)
    Files.write(f.toPath, script.getBytes(StandardCharsets.UTF_8))
    val json = Seq(TestSpark.python, f.getAbsolutePath).!!.trim
    val parsed = Json.decodeObject(json)
    for (m <- Seq("full", "same", "valid"); (tag, n) <- Seq("xk" -> 7, "short" -> 2)) {
      val pair = parsed.get(m + tag).asInstanceOf[java.util.List[java.util.List[Number]]]
      val (er, ei) = reference(re.take(n), im.take(n), kr, ki, m)
      assert(pair.get(0).size() == er.length, s"$m $tag length")
      er.indices.foreach { o =>
        assert(math.abs(pair.get(0).get(o).doubleValue() - er(o)) < 1e-12, s"$m $tag re[$o]")
        assert(math.abs(pair.get(1).get(o).doubleValue() - ei(o)) < 1e-12, s"$m $tag im[$o]")
      }
    }
  }

  test("short series (1, 2, 7, 40 samples) x kernels 1, 2, 3, 5, 64, 1000 x every mode x several layouts") {
    val ls = Seq(1, 2, 3, 5, 64, 1000)
    var c = 0
    for (n <- Seq(1, 2, 7, 40)) {
      val (re, im) = series(n, n)
      val lays = layouts(re, im)
      for (l <- ls; mode <- Seq("full", "same", "valid")) {
        val (kr, ki) = kernel(l, n)
        val (name, mk) = lays(c % lays.length)
        c += 1
        check(mk(), re, im, kr, ki, mode, s"N=$n L=$l $mode $name")
      }
    }
  }

  test("10^4 samples: every kernel length (1, 2, 3, 5, 64, 1000) x every mode x every layout") {
    val (re, im) = series(10000, 42)
    val lays = layouts(re, im)
    var c = 0
    for (l <- Seq(1, 2, 3, 5, 64, 1000); mode <- Seq("full", "same", "valid")) {
      val (kr, ki) = kernel(l, 42)
      val (name, mk) = lays(c % lays.length)
      c += 1
      check(mk(), re, im, kr, ki, mode, s"N=1e4 L=$l $mode $name")
    }
    // And every layout with one even kernel in "same" (the mode whose centring differs for even L).
    val (kr, ki) = kernel(64, 3)
    lays.foreach { case (name, mk) => check(mk(), re, im, kr, ki, "same", s"N=1e4 L=64 same $name") }
  }

  test("10^5 samples over contiguous, repartitioned and coalesced layouts") {
    val (re, im) = series(100000, 5)
    val (k5r, k5i) = kernel(5, 5)
    val (k1000r, k1000i) = kernel(1000, 5)
    check(contiguous(re, im, 7), re, im, k5r, k5i, "same", "N=1e5 L=5 same contiguous(7)")
    check(contiguous(re, im, 2).repartition(3), re, im, k1000r, k1000i, "full", "N=1e5 L=1000 full repartition(3)")
    check(contiguous(re, im, 7).coalesce(3), re, im, k1000r, k1000i, "valid", "N=1e5 L=1000 valid coalesce(7->3)")
  }

  test("a spark.range-based series, int ids and float columns are cast") {
    val n = 3000
    val df = spark.range(0, n, 1, 3).select(col("id").cast(IntegerType).as("t"),
      (col("id") % 17 - 8).cast(FloatType).as("x"), (col("id") % 5).cast(FloatType).as("y"))
    val re = Array.tabulate(n)(i => (i % 17 - 8).toDouble)
    val im = Array.tabulate(n)(i => (i % 5).toDouble)
    val conv = new Convolve().setIdCol("t").setRealCol("x").setImagCol("y").setKernelReal(Array(1, -2, 0.5))
      .setKernelImag(Array(0, 1, 0)).setMode("full")
    val out = conv.transform(df)
    assert(out.schema.fieldNames.toSeq == Seq("t", "x", "y"))
    val got = out.orderBy("t").collect()
    val (er, ei) = reference(re, im, Array(1, -2, 0.5), Array(0, 1, 0), "full")
    assert(got.length == er.length)
    got.zipWithIndex.foreach { case (r, o) =>
      assert(r.getLong(0) == o && math.abs(r.getDouble(1) - er(o)) < 1e-9 && math.abs(r.getDouble(2) - ei(o)) < 1e-9)
    }
  }

  test("real-valued input (imagCol empty), with a real and with a complex kernel") {
    val (re, _) = series(5000, 9)
    val df = contiguous(re, new Array[Double](re.length), 3).drop("imag")
    val (kr, ki) = kernel(5, 9)
    check(df, re, null, kr, Array.empty, "same", "real series, real kernel", realOnly = true)
    check(df, re, null, kr, ki, "valid", "real series, complex kernel", realOnly = true)
    val out = new Convolve().setImagCol("").setKernelReal(kr).transform(df)
    assert(out.schema.fieldNames.toSeq == Seq("id", "real", "imag"))
  }

  test("runs whose halos touch inside one partition (a new Run stream) and other odd layouts") {
    val n = 40
    val (re, im) = series(n, 11)
    def layout(parts: Seq[Seq[Int]]): DataFrame = {
      val rdd = spark.sparkContext.parallelize(parts, parts.length)
        .flatMap(ids => ids.map(i => Row(i.toLong, re(i), im(i))))
      spark.createDataFrame(rdd, seriesSchema)
    }
    // L = 5, same: hl = hr = 2, so [0,10)'s right halo ends at 11 and [14,20)'s left halo starts at 12.
    val touching = layout(Seq((0 until 10) ++ (14 until 20), (10 until 14) ++ (20 until 40)))
    for (mode <- Seq("full", "same", "valid")) {
      val (kr, ki) = kernel(5, 11)
      check(touching, re, im, kr, ki, mode, s"touching halos $mode")
    }
    // Descending order, an empty partition, and a single-sample partition.
    val odd = layout(Seq((0 until 20).reverse, Seq(), Seq(20), 21 until 40))
    val (kr, ki) = kernel(3, 11)
    check(odd, re, im, kr, ki, "full", "descending + empty partition")
  }

  test("a scattered layout is re-laid out by id when a partition has too many runs") {
    val (re, im) = series(3000, 13)
    val (kr, ki) = kernel(7, 13)
    withConf(FerryConf.ConvolveMaxRuns -> "5") {
      check(contiguous(re, im, 2).repartition(3), re, im, kr, ki, "same", "re-laid out")
      check(blocks(re, im, 3, 100, 1L), re, im, kr, ki, "full", "blocks re-laid out")
    }
  }

  /** Writes a DataFrame as Parquet with small row groups (several splits per file) and reads it back. */
  private def parquet(df: DataFrame, name: String): DataFrame = {
    val dir = new File(TestSpark.tempDir, s"$name-${System.nanoTime()}").getAbsolutePath
    df.write.option("parquet.block.size", "8192").parquet(dir)
    spark.read.parquet(dir)
  }

  test("a Parquet series is read in column batches and convolves exactly over files, splits and runs") {
    val (re, im) = series(20000, 21)
    val (kr, ki) = kernel(64, 21)
    val (k5r, k5i) = kernel(5, 21)
    withConf("spark.sql.files.maxPartitionBytes" -> "65536", "spark.sql.files.openCostInBytes" -> "1024") {
      Seq("1 file" -> contiguous(re, im, 1), "7 files" -> contiguous(re, im, 7),
        "3 files of scattered blocks" -> blocks(re, im, 3, 700, 5L)).foreach { case (what, df) =>
        val in = parquet(df, "series")
        assert(SampleChunks.columnarSource(in.select("id", "real", "imag")).isDefined, what)
        assert(in.rdd.getNumPartitions > 1 || what == "1 file", s"$what: ${in.rdd.getNumPartitions} partitions")
        check(in, re, im, kr, ki, "same", s"Parquet $what, 64 taps")
        check(in, re, im, k5r, k5i, "full", s"Parquet $what, 5 taps")
        // Columns in another order, and the row path for a selection Spark computes (a filter).
        check(in.select("imag", "id", "real"), re, im, k5r, k5i, "valid", s"Parquet $what, reordered")
        val filtered = in.where(col("real") > -100.0)
        assert(SampleChunks.columnarSource(filtered.select("id", "real", "imag")).isEmpty)
        check(filtered, re, im, k5r, k5i, "same", s"Parquet $what, filtered (row path)")
      }
    }
  }

  /** The runs the id pass finds in `in` (a Parquet series), per partition. */
  private def idPassRuns(in: DataFrame): Map[Int, Seq[ConvolvePlan.RunInfo]] = {
    val names = ConvolvePlan.Names("id", "real", "imag")
    val source = new Convolve().setKernelReal(Array(1.0)).sourceOf(in, in.select("id", "real", "imag"))._2
    Convolve.planWithHeads(source, names, Int.MaxValue, 0)._1.map(p => p.partition -> p.runs.toSeq).toMap
  }

  test("Parquet footers give the runs the id pass finds, over files, row groups and split files") {
    val (re, im) = series(20000, 8)
    // Split files (64 KB partitions of ~70 KB files), and whole files packed several to a
    // partition, largest first (so a partition holds runs out of id order).
    Seq(("1 file, split", 1, "65536"), ("7 files, split", 7, "65536"), ("7 files, packed", 7, "262144"))
      .foreach { case (what, files, maxBytes) =>
        withConf("spark.sql.files.maxPartitionBytes" -> maxBytes, "spark.sql.files.openCostInBytes" -> "1024") {
          val in = parquet(contiguous(re, im, files), "footers")
          val parts = in.rdd.getNumPartitions
          val plans = ParquetRuns.plans(in, parts, Int.MaxValue).getOrElse(fail(s"$what: no plan from the footers"))
          assert(plans.map(p => p.partition -> p.runs.toSeq).toMap == idPassRuns(in), what)
          assert(plans.map(_.rows).sum == 20000 && plans.length == parts && parts > 1, what)
          if (what.endsWith("packed")) assert(plans.exists(_.runs.length > 1), what)
        }
      }
    withConf("spark.sql.files.maxPartitionBytes" -> "65536", "spark.sql.files.openCostInBytes" -> "1024") {
      // A row group whose ids do not fill its range, a filter, a non-Parquet source: the id pass plans.
      val gaps = parquet(blocks(re, im, 3, 7, 2L), "footers-gaps")
      assert(ParquetRuns.plans(gaps, gaps.rdd.getNumPartitions, Int.MaxValue).isEmpty)
      val in = parquet(contiguous(re, im, 2), "footers-filter")
      val filtered = in.where(col("id") >= 0)
      assert(ParquetRuns.plans(filtered, filtered.rdd.getNumPartitions, Int.MaxValue).isEmpty)
      assert(ParquetRuns.plans(contiguous(re, im, 2), 2, Int.MaxValue).isEmpty)
      assert(ParquetRuns.plans(in, in.rdd.getNumPartitions + 1, Int.MaxValue).isEmpty)
      val (kr, ki) = kernel(5, 8)
      check(gaps, re, im, kr, ki, "same", "Parquet row groups with gaps (id pass)")
    }
  }

  test("Parquet row groups holding their ids out of order convolve exactly; a duplicate id fails naming it") {
    val (re, im) = series(12000, 12)
    // One row group per file, each file a contiguous range of ids in shuffled order: the footers
    // say nothing about the order, so each run is placed by id as its rows arrive.
    val dir = new File(TestSpark.tempDir, s"shuffled-${System.nanoTime()}").getAbsolutePath
    contiguous(re, im, 1).repartitionByRange(4, col("id")).sortWithinPartitions(org.apache.spark.sql.functions.rand(3))
      .write.parquet(dir)
    val in = spark.read.parquet(dir)
    assert(ParquetRuns.plans(in, in.rdd.getNumPartitions, Int.MaxValue).isDefined)
    assert(in.select("id").collect().take(50).map(_.getLong(0)).toSeq != (0L until 50L))
    Seq(1, 2, 5, 64, 1000).foreach { l =>
      val (kr, ki) = kernel(l, 12)
      Seq("same", "full", "valid").foreach(m => check(in, re, im, kr, ki, m, s"shuffled row groups, $l taps, $m"))
    }
    // Ids 0..5999 with 4000 twice and 4001 missing: the footers' range and count still agree.
    val dup = new File(TestSpark.tempDir, s"dup-${System.nanoTime()}").getAbsolutePath
    spark.range(0, 6000, 1, 1).select(when(col("id") === 4001, lit(4000L)).otherwise(col("id")).as("id"),
      (col("id") * 0.5).as("real"), lit(1.0).as("imag")).write.parquet(dup)
    val dupIn = spark.read.parquet(dup)
    assert(ParquetRuns.plans(dupIn, dupIn.rdd.getNumPartitions, Int.MaxValue).isDefined)
    // One run from id 0: no heads to read, so the compute pass finds it.
    val e = FerryException.find(intercept[Exception](k3.transform(dupIn).collect())).getOrElse(fail("no FerryException"))
    assert(e.isInstanceOf[InvalidInputException], e)
    assert(e.getMessage.contains("duplicate id 4000") && e.getMessage.contains("dropDuplicates"), e.getMessage)
  }

  test("on Parquet the planning pass reads the id column alone, and footers clear the value columns of nulls") {
    val (re, im) = series(9000, 4)
    withConf("spark.sql.files.maxPartitionBytes" -> "65536", "spark.sql.files.openCostInBytes" -> "1024") {
      val in = parquet(contiguous(re, im, 3), "ids-only")
      val conv = new Convolve().setKernelReal(Array(0.5, 0.25, 0.125))
      val selected = in.select(col("id"), col("real"), col("imag"))
      conv.sourceOf(in, selected)._2 match {
        case s: Convolve.ColumnarSource =>
          val (idScan, _) = s.ids.getOrElse(fail("no id-only scan for a Parquet series"))
          assert(idScan.getNumPartitions == s.rdd.getNumPartitions && idScan.getNumPartitions > 1)
          assert(idScan.map(_.numCols()).collect().toSet == Set(1))
          assert(!s.planChecksValues)
        case other => fail(s"expected a columnar source, got $other")
      }
      assert(Convolve.footersCountNoNulls(in, Seq("real", "imag")))
      val withNull = parquet(contiguous(re, im, 3).withColumn("real",
        when(col("id") === 8000, lit(null).cast(DoubleType)).otherwise(col("real"))), "ids-only-null")
      assert(!Convolve.footersCountNoNulls(withNull, Seq("real", "imag")))
      assert(Convolve.footersCountNoNulls(withNull, Seq("imag")))
      // Not Parquet: the footers cannot tell, so the query decides.
      assert(!Convolve.footersCountNoNulls(contiguous(re, im, 2), Seq("real", "imag")))
      val e = error[InvalidInputException](withNull, conv)
      assert(e.getMessage.contains("'real'") && e.getMessage.contains("id 8000"), e.getMessage)
    }
  }

  test("Parquet nulls and Parquet files rewritten between the passes fail with InvalidInputException") {
    val base = spark.range(0, 5000, 1, 2).select(col("id"), (col("id") * 0.5).as("real"), lit(0.0).as("imag"))
    val nullImag = parquet(base.withColumn("imag",
      when(col("id") === 4321, lit(null).cast(DoubleType)).otherwise(col("imag"))), "nulls")
    val e1 = error[InvalidInputException](nullImag, k3)
    assert(e1.getMessage.contains("'imag'") && e1.getMessage.contains("id 4321"), e1.getMessage)
    val nullId = parquet(base.withColumn("id", when(col("id") === 30, lit(null).cast(LongType)).otherwise(col("id"))),
      "null-ids")
    assert(error[InvalidInputException](nullId, k3).getMessage.contains("'id' is null"))

    def parts(dir: File) = dir.listFiles().filter(_.getName.startsWith("part-")).sortBy(_.getName)
    val dir = new File(TestSpark.tempDir, s"rewritten-${System.nanoTime()}")
    val other = new File(TestSpark.tempDir, s"rewritten-other-${System.nanoTime()}")
    base.write.parquet(dir.getAbsolutePath)
    base.withColumn("real", col("real") + 1.0).write.parquet(other.getAbsolutePath)
    dir.listFiles().filter(_.getName.endsWith(".crc")).foreach(_.delete())
    val out = k3.transform(spark.read.parquet(dir.getAbsolutePath)) // the planning pass reads the original files
    // Same file names and row counts, other values: only the recorded edge samples can tell.
    parts(dir).zip(parts(other)).foreach { case (a, b) =>
      Files.copy(b.toPath, a.toPath, java.nio.file.StandardCopyOption.REPLACE_EXISTING)
    }
    val e = intercept[Exception](out.collect())
    val f = FerryException.find(e).getOrElse(fail("no FerryException", e))
    assert(f.isInstanceOf[InvalidInputException] && f.getMessage.contains("changed between its planning pass"),
      f.getMessage)
  }

  test("input that changes between the planning and the compute pass is detected") {
    val jitter = org.apache.spark.sql.functions.udf(() => scala.util.Random.nextDouble()).asNondeterministic()
    val df = spark.range(0, 200, 1, 2).select(col("id"), jitter().as("real"), lit(0.0).as("imag"))
    val e = intercept[Exception](k3.transform(df).collect())
    val f = FerryException.find(e).getOrElse(fail("no FerryException", e))
    assert(f.isInstanceOf[InvalidInputException])
    assert(f.getMessage.contains("changed between its planning pass and its compute pass") &&
      f.getMessage.contains("cache()"), f.getMessage)
    // Cached, the same series is stable and convolves.
    val cached = df.cache()
    try assert(k3.transform(cached).count() == 200) finally cached.unpersist()
  }

  test("an empty series gives an empty DataFrame with the output schema") {
    val out = new Convolve().setKernelReal(Array(1.0, 2.0)).transform(spark.createDataFrame(
      spark.sparkContext.emptyRDD[Row], seriesSchema))
    assert(out.schema == Convolve.outputSchema("id", "real", "imag"))
    assert(out.count() == 0)
  }

  private def error[T <: FerryException](df: DataFrame, conv: Convolve)(implicit ct: reflect.ClassTag[T]): T = {
    val e = intercept[T](conv.transform(df))
    assert(e.getMessage.nonEmpty)
    e
  }

  private val k3 = new Convolve().setKernelReal(Array(1.0, 2.0, 3.0))

  test("ids that are not a dense range 0..N-1 fail on the driver with InvalidInputException") {
    val base = spark.range(0, 100, 1, 3).select(col("id"), lit(1.0).as("real"), lit(0.0).as("imag"))
    val missing = error[InvalidInputException](base.where("id < 40 or id >= 45"), k3)
    assert(missing.getMessage.contains("missing ids [40, 45)"), missing.getMessage)
    val dup = error[InvalidInputException](base.union(base.where("id between 10 and 12")), k3)
    assert(dup.getMessage.contains("duplicate ids [10, 13)"), dup.getMessage)
    val shifted = error[InvalidInputException](base.where("id >= 5"), k3)
    assert(shifted.getMessage.contains("ids must start at 0, found smallest id 5"), shifted.getMessage)
    val negative = error[InvalidInputException](base.select((col("id") - 3).as("id"), col("real"), col("imag")), k3)
    assert(negative.getMessage.contains("found smallest id -3"), negative.getMessage)
  }

  test("null values fail with InvalidInputException naming the column and the id") {
    val base = spark.range(0, 50, 1, 2).select(col("id"), lit(1.0).as("real"), lit(0.0).as("imag"))
    val nullReal = base.withColumn("real", when(col("id") === 17, lit(null).cast(DoubleType)).otherwise(col("real")))
    val e1 = error[InvalidInputException](nullReal, k3)
    assert(e1.getMessage.contains("'real'") && e1.getMessage.contains("id 17"), e1.getMessage)
    val nullImag = base.withColumn("imag", when(col("id") === 3, lit(null).cast(DoubleType)).otherwise(col("imag")))
    val e2 = error[InvalidInputException](nullImag, k3)
    assert(e2.getMessage.contains("'imag'") && e2.getMessage.contains("id 3"), e2.getMessage)
    val nullId = base.withColumn("id", when(col("id") === 30, lit(null).cast(LongType)).otherwise(col("id")))
    val e3 = error[InvalidInputException](nullId, k3)
    assert(e3.getMessage.contains("'id' is null"), e3.getMessage)
  }

  test("missing columns and wrong types fail in transformSchema with SchemaMismatchException") {
    val df = spark.range(10).select(col("id"), lit(1.0).as("real"), lit(0.0).as("imag"), lit("s").as("text"))
    val noImag = intercept[SchemaMismatchException](k3.copy(ConvolveSuite.ParamMapEmpty).setImagCol("im").transformSchema(df.schema))
    assert(noImag.getMessage.contains("'im' does not exist") && noImag.getMessage.contains("real"), noImag.getMessage)
    val strId = intercept[SchemaMismatchException](k3.copy(ConvolveSuite.ParamMapEmpty).setIdCol("text").transformSchema(df.schema))
    assert(strId.getMessage.contains("must be bigint or int, found string"), strId.getMessage)
    val longReal = intercept[SchemaMismatchException](k3.copy(ConvolveSuite.ParamMapEmpty).setRealCol("id").setIdCol("id")
      .transformSchema(df.schema))
    assert(longReal.getMessage.contains("must be double or float, found bigint"), longReal.getMessage)
    intercept[SchemaMismatchException](k3.transform(df.drop("real")))
  }

  test("bad kernels and modes fail in transformSchema with InvalidParamsException") {
    val df = spark.range(10).select(col("id"), lit(1.0).as("real"), lit(0.0).as("imag"))
    val empty = intercept[InvalidParamsException](new Convolve().setKernelReal(Array.empty).transformSchema(df.schema))
    assert(empty.getMessage.contains("at least one tap"), empty.getMessage)
    val unset = intercept[InvalidParamsException](new Convolve().transformSchema(df.schema))
    assert(unset.getMessage.contains("setKernelReal"), unset.getMessage)
    val mode = intercept[InvalidParamsException](k3.copy(ConvolveSuite.ParamMapEmpty).setMode("middle").transformSchema(df.schema))
    assert(mode.getMessage.contains("full, same, valid") && mode.getMessage.contains("middle"), mode.getMessage)
    val imag = intercept[InvalidParamsException](k3.copy(ConvolveSuite.ParamMapEmpty).setKernelImag(Array(1.0)).transformSchema(df.schema))
    assert(imag.getMessage.contains("kernelImag has 1 values but kernelReal has 3"), imag.getMessage)
    // The worker's own validation is reached too (the single source of truth): a NaN-free but
    // enormous kernel is fine, while a mode that passes the JVM check is checked again there.
    assert(k3.transformSchema(df.schema).fieldNames.toSeq == Seq("id", "real", "imag"))
  }

  test("transform fails with WorkerUnavailableException, before any compute job, when no worker can start") {
    // The worker's check of the params runs beside the planning job: its failure must still
    // surface from transform itself, not later from the user's action.
    val (re, im) = series(50, 5)
    val df = contiguous(re, im, 2)
    spark.conf.set(FerryConf.Python, "/nonexistent/python3")
    try {
      val e = intercept[WorkerUnavailableException](k3.transform(df))
      assert(e.getMessage.contains(FerryConf.Python), e.getMessage)
    } finally spark.conf.set(FerryConf.Python, TestSpark.python)
    assert(k3.transform(df).count() == 50)
  }

  test("a streaming DataFrame fails with a clear message") {
    val input = MemoryStream[Long](Encoders.scalaLong, spark)
    val df = input.toDF().select(col("value").as("id"), lit(1.0).as("real"), lit(0.0).as("imag"))
    // The schema alone is fine (it has the right columns) ...
    assert(k3.transformSchema(df.schema).length == 3)
    // ... but a streaming series is never complete.
    val e = intercept[InvalidInputException](k3.transform(df))
    assert(e.getMessage.contains("streaming") && e.getMessage.contains("whole series"), e.getMessage)
  }

  test("save and load round trip") {
    val conv = new Convolve().setIdCol("t").setRealCol("x").setImagCol("").setKernelReal(Array(0.5, 0.25))
      .setKernelImag(Array(1.0, -1.0)).setMode("full")
    val path = new File(TestSpark.newDir("convolve"), "stage").getAbsolutePath
    conv.write.overwrite().save(path)
    val loaded = Convolve.load(path)
    assert(loaded.uid == conv.uid)
    assert(loaded.getIdCol == "t" && loaded.getRealCol == "x" && loaded.getImagCol == "" && loaded.getMode == "full")
    assert(loaded.getKernelReal.toSeq == Seq(0.5, 0.25) && loaded.getKernelImag.toSeq == Seq(1.0, -1.0))
    val df = spark.range(0, 10, 1, 2).select(col("id").as("t"), col("id").cast(DoubleType).as("x"))
    assert(loaded.transform(df).collect().toSet == conv.transform(df).collect().toSet)
  }
}

object ConvolveSuite {
  import org.apache.spark.ml.param.ParamMap
  private[ferry] val ParamMapEmpty: ParamMap = ParamMap.empty

  /**
   * numpy.convolve(x, k, mode) by the direct double-precision sum (x complex = re + i im). The
   * `mode` output o is the full output o + s, s as in python/ferry/stages/convolve.py.
   */
  def reference(re: Array[Double], im: Array[Double], kr: Array[Double], ki: Array[Double],
      mode: String): (Array[Double], Array[Double]) = {
    val n = re.length
    val l = kr.length
    val kim = if (ki == null || ki.isEmpty) new Array[Double](l) else ki
    val xim = if (im == null) new Array[Double](n) else im
    val (s, outLen) = ConvolvePlan.geometry(n.toLong, l, mode)
    val yr = new Array[Double](outLen.toInt)
    val yi = new Array[Double](outLen.toInt)
    var o = 0
    while (o < outLen) {
      val f = o + s.toInt
      var accR = 0.0
      var accI = 0.0
      var j = math.max(0, f - n + 1)
      val jEnd = math.min(l - 1, f)
      while (j <= jEnd) {
        val x = f - j
        accR += kr(j) * re(x) - kim(j) * xim(x)
        accI += kr(j) * xim(x) + kim(j) * re(x)
        j += 1
      }
      yr(o) = accR
      yi(o) = accI
      o += 1
    }
    (yr, yi)
  }
}
